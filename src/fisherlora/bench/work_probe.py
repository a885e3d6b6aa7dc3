"""The rows each product of the Fisher statistics would take, read off the model and the calibration
batches (for `work_count.count_work`).

One forward and one backward pass per batch, as the statistics pass runs them (eval mode, the
summed cross-entropy over the loss terms of the model's head, `dL/dy` at every targeted output, no
weight gradient), but nothing is accumulated: each call of a targeted layer is counted (rows, rows
with a loss term, rows with a nonzero output gradient) and the identity of its input tensor is
recorded. Layers read one input tensor when their calls' inputs are the same tensor objects, in the
same order, in every batch, as `stats/shared_inputs.py` decides (convolutions never share).

For the true Fisher the count assumes each label draw drops the rows the empirical pass drops. A row
that is zero in exact arithmetic but not always in floating point (a query's gradient at a sequence's
first position, which attends to itself alone) can come out zero in one pass and ~1e-8 in another, so
the count can differ by such rows: a few per batch, a small fraction of the total.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from ..stats.heads import head_of
from ..stats.hooks import targets_in_graph
from ..stats.layers import TargetLayer, layer_type_of, output_gradient_rows, weight_matrix
from ..stats.objective import LossTerms, batch_terms, logits_of, split_batch, summed_cross_entropy
from ..stats.shared_inputs import InputKey, input_key
from .work_count import LayerRows


@dataclass
class _Call:
    layer: int
    key: InputKey
    leading_shape: tuple[int, ...]
    output: torch.Tensor
    layer_input: torch.Tensor  # keeps the input (and so its key) alive for the batch


@dataclass
class _Counts:
    rows: int = 0
    act_rows: int = 0
    grad_rows: int = 0
    grad_mean_rows: int = 0
    groups: list[int] = field(default_factory=list)  # the layer's input group in each batch


@dataclass(frozen=True)
class ProbedRows:
    """Attributes:
        layers: every target's `LayerRows` (input groups numbered from 0).
        tokens: rows of the targeted layer with the most rows (the tokens of a transformer).
        untargeted_forward: forward multiply-adds of the linear layers not targeted (the output
            layer, a classifier head), summed over the batches, for scale: no method avoids them.
    """

    layers: list[LayerRows]
    tokens: int
    untargeted_forward: int


def _leading_shape(layer_type: str, layer_input: torch.Tensor, output: torch.Tensor) -> tuple[int, ...]:
    if layer_type == "conv2d":  # one row per output position, as `layers.input_rows` unfolds it
        return (int(output.shape[0]), int(output[0, 0].numel()))
    return tuple(int(size) for size in layer_input.shape[:-1])


def _batch_terms(model: nn.Module, batch: Any, labels: torch.Tensor | None, attention_mask: torch.Tensor | None,
                 logits: torch.Tensor) -> LossTerms:
    layout = head_of(model).layout or ("sequence" if logits.dim() == 2 else "causal")
    input_ids = batch.get("input_ids") if isinstance(batch, dict) else None
    return batch_terms(layout, labels, input_ids, attention_mask, int(logits.shape[0]))


def _groups_of(calls: list[_Call], layers: int) -> list[int]:
    """Each layer's input group in one batch: layers whose calls read the same tensors share one."""
    keys: list[list[InputKey]] = [[] for _ in range(layers)]
    for call in calls:
        keys[call.layer].append(call.key)
    owners: dict[tuple[InputKey, ...], int] = {}
    groups = []
    for index, layer_keys in enumerate(keys):
        if layer_keys and all(key is not None for key in layer_keys):
            groups.append(owners.setdefault(tuple(layer_keys), index))
        else:
            groups.append(-1 - index)  # a group of its own
    return groups


def probe_rows(model: nn.Module, targets: Sequence[TargetLayer], batches: Sequence[Any]) -> ProbedRows:
    """Count the rows of every product of the statistics pass over `batches` (see the module doc).

    Args:
        model: a plain model whose `targets` are the layers (`peft.find_target_layers`); it is put back
            in its training mode and `requires_grad` flags afterwards.
        targets: the targeted layers.
        batches: calibration batches (`model(**batch)` with `labels`, or `(inputs, labels)` pairs).

    Raises:
        ValueError: no target or no batch. TypeError: a batch or model output the statistics would
        refuse too (see `stats.objective`).
    """
    if not targets or not batches:
        raise ValueError(f"nothing to probe: {len(targets)} targets, {len(batches)} batches")
    index_of = {id(target.hook_module): index for index, target in enumerate(targets)}
    counts = [_Counts() for _ in targets]
    calls: list[_Call] = []
    untargeted = [0]

    def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        target = targets[index_of[id(module)]]
        leading = _leading_shape(target.layer_type, args[0], output)
        calls.append(_Call(index_of[id(module)], input_key(target.layer_type, args[0]), leading, output, args[0]))

    def count_untargeted(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        d_out, d_in = weight_matrix(module, layer_type_of("", module)).shape
        untargeted[0] += args[0][..., 0].numel() * int(d_in) * int(d_out)

    targeted = {id(target.hook_module) for target in targets} | {id(target.weight_module) for target in targets}
    handles = [target.hook_module.register_forward_hook(record) for target in targets]
    handles += [module.register_forward_hook(count_untargeted) for module in model.modules()
                if id(module) not in targeted and isinstance(module, nn.Linear)]
    try:
        with targets_in_graph(model, [target.weight_module for target in targets]):
            _probe_batches(model, targets, batches, calls, counts)
    finally:
        for handle in handles:
            handle.remove()
        calls.clear()
    signatures: dict[tuple[int, ...], int] = {}
    layers = []
    for target, count in zip(targets, counts, strict=True):
        d_out, d_in = (int(size) for size in weight_matrix(target.weight_module, target.layer_type).shape)
        shared = all(group >= 0 for group in count.groups)
        layers.append(LayerRows(target.name, d_out, d_in, count.rows, count.act_rows, count.grad_rows,
                                count.grad_mean_rows,
                                signatures.setdefault(tuple(count.groups), len(signatures)) if shared else None))
    return ProbedRows(layers, max(layer.rows for layer in layers), untargeted[0])


def _probe_batches(model: nn.Module, targets: Sequence[TargetLayer], batches: Sequence[Any], calls: list[_Call],
                   counts: list[_Counts]) -> None:
    """One forward and backward per batch; each call of a targeted layer counted into `counts`."""
    for batch in batches:
        calls.clear()
        forward, labels, attention_mask = split_batch(batch)
        logits = logits_of(forward(model))
        terms = _batch_terms(model, batch, labels, attention_mask, logits)
        assert terms.targets is not None
        loss = summed_cross_entropy(logits, terms.targets.to(logits.device))
        edges = [get_gradient_edge(call.output) for call in calls]
        gradients = torch.autograd.grad(loss, edges, allow_unused=True)
        for call, gradient in zip(calls, gradients, strict=True):
            _count_call(counts[call.layer], targets[call.layer], call, gradient, terms)
        for count, group in zip(counts, _groups_of(calls, len(targets)), strict=True):
            count.groups.append(group)


def _count_call(count: _Counts, target: TargetLayer, call: _Call, gradient: torch.Tensor | None,
                terms: LossTerms) -> None:
    rows = 1
    for size in call.leading_shape:
        rows *= size
    kept = terms.rows(call.leading_shape)
    kept = torch.ones(rows, dtype=torch.bool) if kept is None else kept.cpu()
    count.rows += rows
    count.act_rows += int(kept.sum())
    if gradient is None:  # the output does not reach the loss: g_t = 0 everywhere
        return
    live = output_gradient_rows(target.layer_type, gradient).abs().amax(1).cpu() != 0
    count.grad_rows += int((live & kept).sum())
    count.grad_mean_rows += int(live.sum())


__all__ = ["ProbedRows", "probe_rows"]
