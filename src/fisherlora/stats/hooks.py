"""Forward hooks that record each targeted layer's calls, and one pass of the data through the model.

A forward hook records a layer's input rows `x_t` (a float32 copy) and the autograd edge of its
output `y`; after the loss is formed, one `torch.autograd.grad` call returns `dL/dy` at every
recorded edge at once, so per-example gradients are never formed. The edge, not the tensor: an
in-place op after the layer (`ReLU(inplace=True)`, `h += x`, `h.mul_(s)`) rebases the tensor `y` onto
the op's output, and the gradient at the tensor would be the one after the op. The edge keeps the
node that produced `y` (as curvlinops and SINGD do with a tensor hook registered in the forward
hook, without the weight gradients they need to trigger it). The input copy likewise survives an
in-place write to the layer's input (`x += fc(x)`).

The hooks live only inside `collection_mode`, which also puts the model in eval mode with gradients
on the targets' weights only, and undoes all of it on every exit path.
What the loss is, and which positions it keeps, is the step's business (`strategy.py`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from ..config import FisherConfig
from ..phases import phase
from ..terminal import log_line, progress_bars_wanted
from .accumulators import LayerAccumulator
from .errors import StatisticsError
from .layers import TokenRows, input_rows, kept_input_rows, module_weight, output_gradient_rows
from .objective import LossTerms
from .shared_inputs import InputKey, input_key, share_input_sums


@dataclass
class Record:
    """One call of a targeted layer in the current forward pass."""

    accumulator: LayerAccumulator
    rows: TokenRows
    output_edge: GradientEdge | None  # None: the output is not in the autograd graph
    kept_tokens: int | None = None
    input_key: InputKey = None  # calls with the same key read the same tensor (see shared_inputs.py)
    layer_input: torch.Tensor | None = None  # keeps the input (and so its key) alive while recorded
    kept_rows: torch.Tensor | None = None  # indices of the kept rows (see kept_row_index); None: all


@dataclass
class Recorder:
    """The records of the current forward pass; hooks append to it while `active`.

    Attributes:
        accumulators: every accumulator of the pass (layers reading one tensor share `A`).
        rows_by_input: the rows copied from each input tensor in this forward, so that layers
            reading the same tensor copy it once.
    """

    accumulators: list[LayerAccumulator] = field(default_factory=list)
    active: bool = False
    records: list[Record] = field(default_factory=list)
    rows_by_input: dict[InputKey, TokenRows] = field(default_factory=dict)
    terms: LossTerms | None = None  # the pass's loss terms when known before its forward (see recording)
    row_indices: dict[tuple[tuple[int, ...], torch.device], torch.Tensor | None] = field(default_factory=dict)

    def clear(self) -> None:
        self.records.clear()
        self.rows_by_input.clear()
        self.row_indices.clear()
        self.terms = None

    @contextmanager
    def recording(self, terms: LossTerms | None = None) -> Iterator[None]:
        """Record the layer calls of the forward pass run inside (previous records are dropped).

        `terms`: the pass's loss terms, when the step knows them before the forward; `add_forward`
        must then be given the same object. The hooks copy only the kept rows of a linear layer's
        input (one gather, instead of a copy of every row and a gather of it after the forward),
        unless `M` is collected: it takes every row.
        """
        self.clear()
        if not any(accumulator.grad_mean_sum is not None for accumulator in self.accumulators):
            self.terms = terms
        self.active = True
        try:
            with phase("forward"):
                yield
        finally:
            self.active = False

    def kept_rows(self, terms: LossTerms | None, leading_shape: tuple[int, ...],
                  device: torch.device) -> torch.Tensor | None:
        """`kept_row_index`, computed once per row shape and device in a pass."""
        place = (leading_shape, device)
        if place not in self.row_indices:
            self.row_indices[place] = kept_row_index(terms, leading_shape, device)
        return self.row_indices[place]

    def add_forward(self, terms: LossTerms | None, examples: int, batch_index: int) -> None:
        """Add every record's input rows to `A`: those of the examples and positions with a loss term
        (`terms`; None keeps every row)."""
        with phase("statistics"):
            self._add_forward(terms, examples, batch_index)

    def _add_forward(self, terms: LossTerms | None, examples: int, batch_index: int) -> None:
        adding = share_input_sums(self.accumulators, self.records)
        kept_by_input: dict[InputKey, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for record in self.records:
            kept = kept_by_input.get(record.input_key) if record.input_key is not None else None
            if kept is None:
                rows = record.rows.inputs
                index = self.kept_rows(terms, record.rows.leading_shape, rows.device)
                if record.rows.selected:  # the hook copied only the kept rows
                    if terms is not self.terms:
                        raise RuntimeError("add_forward was given other loss terms than the recording")
                    kept = (rows, index)
                else:
                    kept = (rows.index_select(0, index) if index is not None else rows, index)
                if record.input_key is not None:
                    kept_by_input[record.input_key] = kept
            rows, record.kept_rows = kept
            record.kept_tokens = rows.shape[0]
            record.accumulator.add_inputs(rows, examples, batch_index, add_to_sum=id(record.accumulator) in adding)

    def backward(self, loss: torch.Tensor, examples: int, batch_index: int, retain: bool) -> None:
        """`dL/dy` of every recorded output, added to `G` at the kept rows and to `M` at every row.

        `M` takes every row, not only those with a loss term: a position without one (a prompt, an
        unlabeled token) still reaches the loss through attention, and `dL/dW = sum_t g_t x_t^T` over
        all rows is the weight gradient by the chain rule, whatever the model does with padding.
        """
        if not torch.isfinite(loss):
            # detach: float() of a grad-requiring tensor emits a UserWarning alongside the error
            raise StatisticsError(f"non-finite loss ({float(loss.detach())}) at batch {batch_index}")
        edges = []
        for record in self.records:
            if record.output_edge is None:
                raise StatisticsError(
                    f"the output of module {record.accumulator.name!r} is not part of the autograd graph "
                    "(was it called under torch.no_grad or inference_mode?)"
                )
            edges.append(record.output_edge)
        with phase("backward"):
            gradients = torch.autograd.grad(loss, edges, retain_graph=retain, allow_unused=True)
        with phase("statistics"):
            self._add_backward(gradients, examples, batch_index)

    def _add_backward(self, gradients: tuple[torch.Tensor | None, ...], examples: int, batch_index: int) -> None:
        for record, gradient in zip(self.records, gradients, strict=True):
            assert record.kept_tokens is not None
            rows = None
            if gradient is not None:
                rows = output_gradient_rows(record.accumulator.target.layer_type, gradient)
            record.accumulator.add_output_gradients(rows, record.kept_rows, record.kept_tokens, record.rows.inputs,
                                                    examples, batch_index)


def kept_row_index(terms: LossTerms | None, leading_shape: tuple[int, ...],
                   device: torch.device) -> torch.Tensor | None:
    """The indices `(K,)` int64 of the rows with a loss term among `prod(leading_shape)` rows, or
    None when every row is kept (`terms` None, or a mask with no False).

    Indices, not the bool mask: `index_select` gathers rows several times faster than boolean
    indexing on CPU, and one index serves every layer whose rows have this shape.
    """
    mask = terms.rows(leading_shape) if terms is not None else None
    if mask is None:
        return None
    mask = mask.to(device)
    index = mask.nonzero().squeeze(1)
    return None if index.shape[0] == mask.shape[0] else index


class Step(Protocol):
    """Runs one batch: forward under `recorder.recording()`, then `add_forward` and `backward`."""

    def __call__(self, model: nn.Module, batch: Any, recorder: Recorder, generator: torch.Generator,
                 batch_index: int) -> None: ...


@contextmanager
def targets_in_graph(model: nn.Module, weight_modules: list[nn.Module]) -> Iterator[None]:
    """Eval mode, `requires_grad` only on the given modules' weights; both undone on exit."""
    # Per-module modes: a PeftModel wrapper can be in train mode around an eval-mode base.
    modes = {module: module.training for module in model.modules()}
    flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
    try:
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for weight_module in weight_modules:
            # A leaf that requires grad upstream of every target output keeps `y` in the graph;
            # `autograd.grad` is asked only for the outputs, so no weight gradient is computed.
            module_weight(weight_module).requires_grad_(True)
        yield
    finally:
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
        for module, mode in modes.items():
            module.training = mode


@contextmanager
def collection_mode(model: nn.Module, accumulators: list[LayerAccumulator], recorder: Recorder) -> Iterator[None]:
    """Eval mode, gradients only on the targets' weights, hooks installed; all undone on exit."""
    handles = []
    try:
        with targets_in_graph(model, [accumulator.target.weight_module for accumulator in accumulators]):
            for accumulator in accumulators:
                handles.append(
                    accumulator.target.hook_module.register_forward_hook(_record_hook(accumulator, recorder)))
            yield
    finally:
        for handle in handles:
            handle.remove()
        recorder.clear()
        recorder.active = False


def _record_hook(accumulator: LayerAccumulator, recorder: Recorder):  # noqa: ANN202
    target = accumulator.target

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not recorder.active:
            return
        if not isinstance(output, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
            raise TypeError(f"module {target.name!r} did not map a tensor to a tensor; cannot record it")
        key = input_key(target.layer_type, args[0])
        rows = recorder.rows_by_input.get(key) if key is not None else None
        if rows is None:
            with phase("statistics"):
                if recorder.terms is not None and target.layer_type != "conv2d":
                    leading_shape = tuple(args[0].shape[:-1])
                    index = recorder.kept_rows(recorder.terms, leading_shape, args[0].device)
                    rows = kept_input_rows(args[0], index)
                else:
                    rows = input_rows(target.weight_module, target.layer_type, args[0])
            if key is not None:
                recorder.rows_by_input[key] = rows
        edge = get_gradient_edge(output) if output.requires_grad else None
        recorder.records.append(Record(accumulator, rows, edge, input_key=key, layer_input=args[0]))

    return hook


def move_to(batch: Any, device: torch.device) -> Any:
    """The batch with every tensor (in mappings, tuples and lists) on `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: move_to(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to(value, device) for value in batch)
    return batch


def collect_pass(model: nn.Module, accumulators: list[LayerAccumulator], dataloader: Iterable[Any],
                 config: FisherConfig, step: Step, description: str) -> int:
    """One pass over the first `config.num_batches` batches for `accumulators`; returns the number of
    local batches."""
    # Re-seeded every pass: the true Fisher draws the same labels in every pass (they depend on the
    # logits only, not on which layers are recorded), so layer groups see the same gradients.
    generator = torch.Generator().manual_seed(config.seed)
    recorder = Recorder(accumulators=list(accumulators))
    batches = 0
    total = config.num_batches
    if total is None and hasattr(dataloader, "__len__"):
        total = len(dataloader)  # type: ignore[arg-type]
    from tqdm.auto import tqdm

    bars = progress_bars_wanted(config.progress)
    start = time.perf_counter()
    with collection_mode(model, accumulators, recorder), torch.enable_grad():
        device = accumulators[0].device
        progress = tqdm(total=total, desc=description, unit="batch", disable=not bars)
        try:
            # islice, not a break after the last batch: the loader reads no batch beyond it.
            for batch_index, batch in enumerate(itertools.islice(dataloader, config.num_batches)):
                step(model, move_to(batch, device), recorder, generator, batch_index)
                recorder.clear()
                batches += 1
                progress.update(1)
        finally:
            progress.close()
    if config.progress and not bars:
        log_line(f"{description}: {batches} batches, {len(accumulators)} layers, "
                 f"{time.perf_counter() - start:.1f} s")
    return batches
