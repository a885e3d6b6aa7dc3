"""Collect Kronecker-factored Fisher statistics with forward hooks and `torch.autograd.grad`.

Forward hooks record each targeted layer's input rows and its output tensor; after the loss is
formed, one `autograd.grad` call returns `dL/dy` for every recorded output at once. Per-example
gradients are never formed: `A`, `G` and `M` are sums of per-token outer products. Hooks live only
inside `collect_statistics` and are removed on every exit path; `requires_grad` flags and the
train/eval mode are restored.

Bounded memory: a factor wider than `FisherConfig.sketch_threshold` is streamed into a Nystrom sketch
(`sketch.NystromSketch`, `d * k` floats) instead of a dense `d x d` sum; `FisherConfig.layer_groups`
collects contiguous groups of layers in separate passes over the data. Under `torch.distributed`
every sum and count is all-reduced, so all ranks return identical statistics.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import FisherConfig
from .container import FisherStats, LayerStats, weight_fingerprint
from .layers import TokenRows, input_rows, module_weight, output_gradient_rows, weight_matrix
from .objective import (
    IGNORE_INDEX,
    LossFn,
    SampleFn,
    causal_targets,
    default_loss_units,
    logits_of,
    sample_targets,
    split_batch,
    summed_cross_entropy,
    token_mask,
)
from .sketch import LowRankFactor, NystromSketch, layer_statistics_bytes, sketch_seed, sketched_rank


class StatisticsError(ValueError):
    """Statistics could not be collected from the data (empty, all masked, non-finite)."""


@dataclass
class TargetLayer:
    """One layer to collect statistics for.

    Attributes:
        name: module name in the base model (no PEFT prefix).
        hook_module: the module whose forward input `x` and output `y` are recorded (a PEFT LoRA
            wrapper, whose output gradient equals the base layer's, or the layer itself).
        weight_module: the module holding `weight` (the base layer).
        layer_type: "linear", "conv1d" or "conv2d".
    """

    name: str
    hook_module: nn.Module
    weight_module: nn.Module
    layer_type: str


class _DenseSum:
    """`sum_t x_t x_t^T` as a dense `(d, d)` float32 matrix."""

    def __init__(self, dim: int, device: torch.device) -> None:
        self.total = torch.zeros(dim, dim, dtype=torch.float32, device=device)

    def add(self, rows: torch.Tensor) -> None:
        self.total.addmm_(rows.T, rows)

    def reduce_tensors(self) -> list[torch.Tensor]:
        return [self.total]

    def nbytes(self) -> int:
        return self.total.numel() * self.total.element_size()

    def finalize(self, count: int) -> torch.Tensor:
        # In place: the accumulator becomes the statistic, no second d x d copy.
        return self.total.div_(count)


_FactorSum = _DenseSum | NystromSketch


def _factor_sum(dim: int, device: torch.device, config: FisherConfig, name: str, side: str) -> _FactorSum:
    rank = sketched_rank(dim, config.sketch_threshold, config.sketch_rank)
    if rank is None:
        return _DenseSum(dim, device)
    return NystromSketch(dim, rank, sketch_seed(config.sketch_seed, name, side), device)


@dataclass
class _Accumulator:
    target: TargetLayer
    act_sum: _FactorSum
    grad_sum: _FactorSum
    grad_mean_sum: torch.Tensor | None
    tokens_forward: int = 0
    tokens_backward: int = 0
    examples_forward: int = 0
    examples_backward: int = 0

    @classmethod
    def create(cls, target: TargetLayer, with_grad_mean: bool, config: FisherConfig) -> _Accumulator:
        weight = weight_matrix(target.weight_module, target.layer_type)
        d_out, d_in = weight.shape
        device = weight.device
        return cls(
            target=target,
            act_sum=_factor_sum(d_in, device, config, target.name, "act"),
            grad_sum=_factor_sum(d_out, device, config, target.name, "grad"),
            grad_mean_sum=torch.zeros(d_out, d_in, dtype=torch.float32, device=device) if with_grad_mean else None,
        )

    @property
    def device(self) -> torch.device:
        return module_weight(self.target.weight_module).device

    def reduce_tensors(self) -> list[torch.Tensor]:
        tensors = self.act_sum.reduce_tensors() + self.grad_sum.reduce_tensors()
        return tensors + ([self.grad_mean_sum] if self.grad_mean_sum is not None else [])


@dataclass
class _Record:
    accumulator: _Accumulator
    rows: TokenRows
    output: torch.Tensor
    kept_inputs: torch.Tensor | None = None
    row_mask: torch.Tensor | None = None


@dataclass
class _Recorder:
    """Holds the records of the current forward pass; hooks append to it while `active`."""

    active: bool = False
    records: list[_Record] = field(default_factory=list)


def _row_mask(leading_shape: tuple[int, ...], mask: torch.Tensor | None) -> torch.Tensor | None:
    # Per-token masks apply to rows shaped like the batch's tokens; pooled (B, d) rows and
    # convolution positions have no padding to drop.
    if mask is not None and leading_shape == tuple(mask.shape):
        return mask.reshape(-1)
    return None


@contextmanager
def _collection_mode(model: nn.Module, accumulators: list[_Accumulator], recorder: _Recorder) -> Iterator[None]:
    """Eval mode, gradients only on the targets' weights, hooks installed; all undone on exit."""
    # Per-module modes: a PeftModel wrapper can be in train mode around an eval-mode base.
    modes = {module: module.training for module in model.modules()}
    flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
    handles = []
    targets = [accumulator.target for accumulator in accumulators]
    try:
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for target in targets:
            # A leaf that requires grad upstream of every target output keeps `y` in the graph;
            # `autograd.grad` is asked only for the outputs, so no weight gradient is computed.
            module_weight(target.weight_module).requires_grad_(True)

        def make_hook(accumulator: _Accumulator):  # noqa: ANN202
            target = accumulator.target

            def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                if not recorder.active:
                    return
                if not isinstance(output, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
                    raise TypeError(f"module {target.name!r} did not map a tensor to a tensor; cannot record it")
                rows = input_rows(target.weight_module, target.layer_type, args[0])
                recorder.records.append(_Record(accumulator, rows, output))

            return hook

        for accumulator in accumulators:
            handles.append(accumulator.target.hook_module.register_forward_hook(make_hook(accumulator)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        recorder.records.clear()
        recorder.active = False
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
        for module, mode in modes.items():
            module.training = mode


def _add_forward(record: _Record, mask: torch.Tensor | None, examples: int, batch_index: int) -> None:
    rows = record.rows.inputs
    row_mask = _row_mask(record.rows.leading_shape, mask)
    if row_mask is not None:
        row_mask = row_mask.to(rows.device)
        rows = rows[row_mask]
    if not torch.isfinite(rows).all():
        raise StatisticsError(
            f"non-finite input to module {record.accumulator.target.name!r} at batch {batch_index}"
        )
    record.kept_inputs = rows
    record.row_mask = row_mask
    record.accumulator.act_sum.add(rows)
    record.accumulator.tokens_forward += rows.shape[0]
    record.accumulator.examples_forward += examples


def _add_backward(record: _Record, gradient: torch.Tensor | None, examples: int, batch_index: int) -> None:
    accumulator = record.accumulator
    assert record.kept_inputs is not None
    inputs = record.kept_inputs
    accumulator.tokens_backward += inputs.shape[0]
    accumulator.examples_backward += examples
    if gradient is None:  # the output does not reach the loss: g_t = 0
        return
    rows = output_gradient_rows(accumulator.target.layer_type, gradient)
    if record.row_mask is not None:
        rows = rows[record.row_mask]
    if not torch.isfinite(rows).all():
        raise StatisticsError(
            f"non-finite output gradient at module {accumulator.target.name!r} at batch {batch_index}"
        )
    accumulator.grad_sum.add(rows)
    if accumulator.grad_mean_sum is not None:
        accumulator.grad_mean_sum.addmm_(rows.T, inputs)


def _backward(records: list[_Record], loss: torch.Tensor, examples: int, batch_index: int, retain: bool) -> None:
    if not torch.isfinite(loss):
        # detach: float() of a grad-requiring tensor emits a UserWarning alongside the error
        raise StatisticsError(f"non-finite loss ({float(loss.detach())}) at batch {batch_index}")
    outputs = [record.output for record in records]
    for record, output in zip(records, outputs, strict=True):
        if not output.requires_grad:
            raise StatisticsError(
                f"the output of module {record.accumulator.target.name!r} is not part of the autograd graph "
                "(was it called under torch.no_grad or inference_mode?)"
            )
    gradients = torch.autograd.grad(loss, outputs, retain_graph=retain, allow_unused=True)
    for record, gradient in zip(records, gradients, strict=True):
        _add_backward(record, gradient, examples, batch_index)


def _batch_size(batch: Any, logits: torch.Tensor | None) -> int:
    if logits is not None:
        return int(logits.shape[0])
    values = batch.values() if isinstance(batch, Mapping) else batch
    for value in values:
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise TypeError("cannot infer the batch size: the batch holds no tensor")


def _default_step(model: nn.Module, batch: Any, recorder: _Recorder, config: FisherConfig,
                  generator: torch.Generator, batch_index: int) -> None:
    forward, labels, attention_mask = split_batch(batch)
    recorder.records.clear()
    recorder.active = True
    try:
        outputs = forward(model)
    finally:
        recorder.active = False
    logits = logits_of(outputs)
    if logits.dim() == 2:
        if labels is None and config.fisher == "empirical":
            raise StatisticsError(
                "the empirical Fisher needs `labels` in every batch; use fisher='true' for unlabeled data"
            )
        targets = labels if labels is not None else torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        if targets.dim() != 1 or targets.dtype not in (torch.int64, torch.int32):
            raise StatisticsError(
                f"classification labels must be a 1-D integer tensor, got shape {tuple(targets.shape)} and dtype "
                f"{targets.dtype}; pass loss_fn= for regression or multi-label models"
            )
        targets = targets.long()
        mask = token_mask(attention_mask, None, tuple(attention_mask.shape)) if attention_mask is not None else None
    elif logits.dim() == 3:
        input_ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        targets = causal_targets(labels, input_ids, attention_mask)
        mask = token_mask(attention_mask, targets, tuple(targets.shape))
    else:
        raise StatisticsError(f"logits of shape {tuple(logits.shape)} are neither (B, C) nor (B, S, V); pass loss_fn=")
    examples = int(logits.shape[0])
    for record in recorder.records:
        _add_forward(record, mask, examples, batch_index)
    draws = 1 if config.fisher == "empirical" else config.n_samples
    for draw in range(draws):
        drawn = targets if config.fisher == "empirical" else sample_targets(logits, targets, generator)
        loss = summed_cross_entropy(logits, drawn)
        _backward(recorder.records, loss, examples, batch_index, retain=draw < draws - 1)


def _custom_step(model: nn.Module, batch: Any, recorder: _Recorder, config: FisherConfig,
                 loss_fn: LossFn, sample_fn: SampleFn | None, generator: torch.Generator, batch_index: int) -> None:
    if config.fisher == "true" and sample_fn is None:
        raise ValueError("the true Fisher with a custom loss_fn needs sample_fn(model, batch, generator) -> batch")
    draws = 1 if config.fisher == "empirical" else config.n_samples
    for draw in range(draws):
        drawn_batch = batch
        if config.fisher == "true":
            assert sample_fn is not None
            with torch.no_grad():
                drawn_batch = sample_fn(model, batch, generator)
        recorder.records.clear()
        recorder.active = True
        try:
            loss = loss_fn(model, drawn_batch)
        finally:
            recorder.active = False
        if config.loss_reduction == "mean":
            # A mean over N loss units scales every g_t by 1/N; undo it so G does not depend on N.
            loss = loss * default_loss_units(drawn_batch)
        attention_mask = drawn_batch.get("attention_mask") if isinstance(drawn_batch, Mapping) else None
        labels = drawn_batch.get("labels") if isinstance(drawn_batch, Mapping) else None
        mask = None
        if attention_mask is not None:
            causal = labels if isinstance(labels, torch.Tensor) and labels.shape == attention_mask.shape else None
            targets = causal_targets(causal, None, None) if causal is not None else None
            mask = token_mask(attention_mask, targets, tuple(attention_mask.shape))
        examples = _batch_size(drawn_batch, None)
        for record in recorder.records:
            # Each draw repeats the forward: tokens count every time (A stays an average), the
            # examples only once.
            _add_forward(record, mask, examples if draw == 0 else 0, batch_index)
        _backward(recorder.records, loss, examples, batch_index, retain=False)


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: _move(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_move(value, device) for value in batch)
    return batch


def _all_reduce(accumulators: list[_Accumulator], batches: int) -> tuple[int, int]:
    """Sum statistics and counts over `torch.distributed` ranks (a no-op without it).

    Dense factors, sketches (`Y` and the trace: every rank regenerates the same test matrix from the
    seed), `M` and the token/example/batch counts are summed, so every rank finalizes identical
    statistics. Returns `(total batches, world size)`.
    """
    import torch.distributed as distributed

    if not (distributed.is_available() and distributed.is_initialized()):
        return batches, 1
    for accumulator in accumulators:
        for tensor in accumulator.reduce_tensors():
            distributed.all_reduce(tensor)
    device = accumulators[0].device if accumulators else torch.device("cpu")
    counts = torch.tensor(
        [[a.tokens_forward, a.tokens_backward, a.examples_forward, a.examples_backward] for a in accumulators]
        + [[batches, 0, 0, 0]],
        dtype=torch.float64,
        device=device,
    )
    distributed.all_reduce(counts)
    for accumulator, row in zip(accumulators, counts[:-1].tolist(), strict=True):
        (accumulator.tokens_forward, accumulator.tokens_backward,
         accumulator.examples_forward, accumulator.examples_backward) = (int(v) for v in row)
    return int(counts[-1, 0]), distributed.get_world_size()


def layer_groups(targets: list[TargetLayer], config: FisherConfig,
                 with_grad_mean: bool = False) -> list[list[TargetLayer]]:
    """Split the targets into `config.layer_groups` contiguous groups of about equal statistics size.

    Each group is collected in its own pass over the data, so the accumulators (and the recorded
    inputs and outputs of a batch) of only one group are alive at a time.
    """
    count = min(config.layer_groups, len(targets))
    if count <= 1:
        return [list(targets)]
    costs = []
    for target in targets:
        d_out, d_in = weight_matrix(target.weight_module, target.layer_type).shape
        costs.append(layer_statistics_bytes(int(d_out), int(d_in), config.sketch_threshold, config.sketch_rank,
                                            with_grad_mean))
    cumulative = list(itertools.accumulate(costs))
    total = cumulative[-1]
    cuts = []
    start = 0
    for group in range(1, count):
        goal = total * group / count
        cut = start + 1  # every group gets at least one layer, and leaves one for each later group
        while cut < len(targets) - (count - group) and cumulative[cut - 1] < goal:
            cut += 1
        cuts.append(cut)
        start = cut
    bounds = [0, *cuts, len(targets)]
    return [list(targets[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _collect_pass(model: nn.Module, accumulators: list[_Accumulator], dataloader: Iterable[Any],
                  config: FisherConfig, loss_fn: LossFn | None, sample_fn: SampleFn | None, description: str) -> int:
    """One pass over the data for `accumulators`; returns the number of local batches."""
    # Re-seeded every pass: the true Fisher draws the same labels in every pass (they depend on the
    # logits only, not on which layers are recorded), so layer groups see the same gradients.
    generator = torch.Generator().manual_seed(config.seed)
    recorder = _Recorder()
    batches = 0
    total = config.num_batches
    if total is None and hasattr(dataloader, "__len__"):
        total = len(dataloader)  # type: ignore[arg-type]
    from tqdm.auto import tqdm

    with _collection_mode(model, accumulators, recorder), torch.enable_grad():
        device = accumulators[0].device
        progress = tqdm(total=total, desc=description, unit="batch", disable=not config.progress)
        try:
            for batch_index, batch in enumerate(dataloader):
                if config.num_batches is not None and batch_index >= config.num_batches:
                    break
                batch = _move(batch, device)
                if loss_fn is None:
                    _default_step(model, batch, recorder, config, generator, batch_index)
                else:
                    _custom_step(model, batch, recorder, config, loss_fn, sample_fn, generator, batch_index)
                recorder.records.clear()
                batches += 1
                progress.update(1)
        finally:
            progress.close()
    return batches


def _warn_if_shuffled(dataloader: Iterable[Any]) -> None:
    sampler = getattr(dataloader, "sampler", None)
    if isinstance(sampler, torch.utils.data.RandomSampler) and sampler.generator is None:
        warnings.warn(
            "layer_groups > 1 makes one pass over the dataloader per group, and this DataLoader shuffles without a "
            "seeded generator: each group's statistics come from different batches",
            stacklevel=3,
        )


def collect_statistics(
    model: nn.Module,
    targets: list[TargetLayer],
    dataloader: Iterable[Any],
    config: FisherConfig,
    loss_fn: LossFn | None = None,
    sample_fn: SampleFn | None = None,
    with_grad_mean: bool = False,
) -> FisherStats:
    """Run the data through `model` and return `A`, `G` (and `M`) for every target.

    Args:
        model: the model (plain or PEFT); `model(**batch)` or `model(inputs)` must work.
        targets: layers to collect for (see `TargetLayer`).
        dataloader: iterable of batches; the first `config.num_batches` are used. With
            `config.layer_groups > 1` it is iterated once per group and must yield the same
            batches every time (a list, or a DataLoader without unseeded shuffling).
        config: Fisher type, number of batches and samples, loss reduction, seed, progress bar,
            sketching (`sketch_threshold`, `sketch_rank`, `sketch_seed`), `layer_groups` and
            `stats_device`.
        loss_fn: optional `loss_fn(model, batch) -> scalar loss` replacing the default summed
            cross-entropy (for models whose output is not `(B, C)` or causal-LM logits).
        sample_fn: for the true Fisher with a `loss_fn`: returns a batch whose labels are drawn
            from the model's predictive distribution.
        with_grad_mean: also collect `M`.

    Returns:
        `FisherStats` keyed by `TargetLayer.name`. A factor whose dimension exceeds
        `config.sketch_threshold` is a `LowRankFactor`, the others dense tensors. Under
        `torch.distributed` the sums are all-reduced: every rank returns the same statistics.
    """
    if not targets:
        raise ValueError("no layer to collect statistics for: the model has no targeted layer")
    groups = layer_groups(targets, config, with_grad_mean)
    if len(groups) > 1:
        if isinstance(dataloader, Iterator):
            raise ValueError(
                f"FisherConfig.layer_groups={config.layer_groups} makes one pass over the data per group of layers, "
                f"but the dataloader is a one-shot iterator ({type(dataloader).__name__}); pass a list of batches, "
                "a DataLoader or another re-iterable, or set layer_groups=1"
            )
        _warn_if_shuffled(dataloader)
    dtype = str(weight_matrix(targets[0].weight_module, targets[0].layer_type).dtype)
    layers: dict[str, LayerStats] = {}
    batches_per_pass: int | None = None
    world_size = 1
    for index, group in enumerate(groups):
        accumulators = [_Accumulator.create(target, with_grad_mean, config) for target in group]
        description = "Fisher statistics" if len(groups) == 1 else f"Fisher statistics {index + 1}/{len(groups)}"
        local_batches = _collect_pass(model, accumulators, dataloader, config, loss_fn, sample_fn, description)
        batches, world_size = _all_reduce(accumulators, local_batches)
        if batches == 0:
            raise StatisticsError("the dataloader yielded no batches: cannot collect Fisher statistics")
        if batches_per_pass is not None and batches != batches_per_pass:
            raise StatisticsError(
                f"the dataloader yielded {batches_per_pass} batches in the first pass and {batches} in pass "
                f"{index + 1}; layer_groups > 1 needs the same batches in every pass"
            )
        batches_per_pass = batches
        for accumulator in accumulators:
            layers[accumulator.target.name] = _finalize(accumulator, batches, config.stats_device)
        del accumulators
    assert batches_per_pass is not None
    return FisherStats(layers=layers, fisher=config.fisher, num_batches=batches_per_pass,
                       n_samples=config.n_samples if config.fisher == "true" else 1,
                       model_dtype=dtype, world_size=world_size)


def _finite(statistic: torch.Tensor | LowRankFactor | None) -> bool:
    if statistic is None:
        return True
    if isinstance(statistic, LowRankFactor):
        return bool(torch.isfinite(statistic.eigenvectors).all() and torch.isfinite(statistic.eigenvalues).all()
                    and math.isfinite(statistic.trace))
    return bool(torch.isfinite(statistic).all())


def _finalize(accumulator: _Accumulator, batches: int, device: str | None = None) -> LayerStats:
    name = accumulator.target.name
    if accumulator.tokens_forward == 0 or accumulator.tokens_backward == 0:
        raise StatisticsError(
            f"module {name!r} saw no unmasked token in {batches} batches (every position had attention_mask == 0 "
            "or labels == -100, or the module was never called)"
        )
    act_cov = accumulator.act_sum.finalize(accumulator.tokens_forward)
    grad_cov = accumulator.grad_sum.finalize(accumulator.tokens_backward)
    grad_mean = None
    if accumulator.grad_mean_sum is not None:
        grad_mean = accumulator.grad_mean_sum.div_(max(accumulator.examples_backward, 1))
    for label, statistic in (("act_cov", act_cov), ("grad_cov", grad_cov), ("grad_mean", grad_mean)):
        if not _finite(statistic):
            raise StatisticsError(f"statistic {label} of module {name!r} is not finite")
    if device is not None:
        act_cov, grad_cov = act_cov.to(device), grad_cov.to(device)
        grad_mean = grad_mean.to(device) if grad_mean is not None else None
    weight = weight_matrix(accumulator.target.weight_module, accumulator.target.layer_type)
    return LayerStats(
        act_cov=act_cov,
        grad_cov=grad_cov,
        grad_mean=grad_mean,
        num_tokens=accumulator.tokens_forward,
        num_examples=accumulator.examples_forward,
        layer_type=accumulator.target.layer_type,
        weight_shape=(int(weight.shape[0]), int(weight.shape[1])),
        fingerprint=weight_fingerprint(weight),
    )


__all__ = ["IGNORE_INDEX", "StatisticsError", "TargetLayer", "collect_statistics", "layer_groups"]
