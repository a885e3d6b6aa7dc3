"""One input factor `A` for layers that read the same tensor (query/key/value, gate/up).

Such layers have identical `A = (1/T) sum_t x_t x_t^T`: their sums are merged into one object before
the first rows are added, each batch adds the rows once, and every layer's `LayerStats.act_cov` is
the same tensor. Whether two layers read the same tensor is decided per batch from the records of
the forward pass (same tensor object, unchanged since: same autograd version counter), never
assumed from names: layers that read one tensor in one batch and different ones in a later batch
(conditional computation, a changed model) get their own copies of the sum so far (it holds
identical rows up to then) and continue separately, so the statistics equal separate sums always.
Only dense sums of linear or Conv1D layers are shared: their rows are the input itself; a
sketch has a per-layer test matrix and a convolution's rows depend on its kernel.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Sequence
from typing import Protocol

import torch

from .accumulators import DenseSum, LayerAccumulator

InputKey = tuple[int, int] | None
"""`(id(tensor), tensor._version)` of a layer call's input (the record keeps the tensor alive, so the
id is not reused while the records exist); None: never shared."""


def input_key(layer_type: str, layer_input: torch.Tensor) -> InputKey:
    """The sharing key of one recorded call (None for convolutions)."""
    if layer_type == "conv2d":
        return None
    return (id(layer_input), layer_input._version)


class KeyedRecord(Protocol):
    accumulator: LayerAccumulator
    input_key: InputKey


def _shareable(accumulator: LayerAccumulator, keys: list[InputKey]) -> bool:
    return bool(keys) and isinstance(accumulator.act_sum, DenseSum) and all(key is not None for key in keys)


def share_input_sums(accumulators: Sequence[LayerAccumulator], records: Sequence[KeyedRecord]) -> set[int]:
    """Merge, split and choose who adds, for the records of one forward pass.

    Args:
        accumulators: every accumulator of the pass (called in this forward or not).
        records: the layer calls of this forward, in order.

    Layers whose accumulators are all still empty and whose calls read the same tensors, in the
    same order, are merged onto one `DenseSum`; a merged group whose calls now differ is split
    (each member gets a copy). Returns the ids of the accumulators that add their rows to their
    `A` sum this pass: one per sum (the others only count their tokens).
    """
    calls: dict[int, list[InputKey]] = {id(accumulator): [] for accumulator in accumulators}
    for record in records:
        calls[id(record.accumulator)].append(record.input_key)
    if all(accumulator.tokens_forward == 0 for accumulator in accumulators):
        owners: dict[Hashable, LayerAccumulator] = {}
        for accumulator in accumulators:
            keys = calls[id(accumulator)]
            if _shareable(accumulator, keys):
                total = accumulator.act_sum.total  # type: ignore[attr-defined]
                owner = owners.setdefault((tuple(keys), total.shape[0], total.device), accumulator)
                if owner is not accumulator:
                    accumulator.act_sum = owner.act_sum
    members: dict[int, list[LayerAccumulator]] = {}
    for accumulator in accumulators:
        members.setdefault(id(accumulator.act_sum), []).append(accumulator)
    adding: set[int] = set()
    for group in members.values():
        first = group[0]
        if any(calls[id(other)] != calls[id(first)] for other in group[1:]):
            for other in group[1:]:
                other.act_sum = copy.deepcopy(first.act_sum)
            adding.update(id(member) for member in group)
        else:
            adding.add(id(first))
    return adding
