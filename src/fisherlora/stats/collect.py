"""Collect Kronecker-factored Fisher statistics: the entry point that ties hooks, step and sums together.

Per targeted layer `y = W x`, over the `T` kept tokens `t` of the data (those with a loss term) for
`A` and `G`, and over every token for `M`:

    A = (1/T) sum_t x_t x_t^T,   G = (1/T) sum_t g_t g_t^T,   M = (1/E) sum_t g_t x_t^T,

with `g_t = dL/dy_t` of the sum-reduced loss (K-FAC, Martens & Grosse 2015, eq. 1-3). `M` is thus
the weight gradient `dL/dW` over the `E` examples: a token without a loss term of its own (a
prompt) still reaches the loss through attention. `hooks.py`
records the layers and runs a pass, `strategy.py` is the loss and label draws (chosen once here),
`accumulators.py` holds the sums (dense or Nystrom-sketched) and their `torch.distributed`
all-reduce. `FisherConfig.layer_groups` collects contiguous groups of layers in separate passes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

from ..config import FisherConfig
from .accumulators import LayerAccumulator, all_reduce
from .container import FisherStats, LayerStats
from .errors import StatisticsError
from .hooks import collect_pass
from .layers import TargetLayer, check_materialized, weight_matrix
from .objective import IGNORE_INDEX, LossFn, SampleFn
from .replay import SamePasses
from .sketch import layer_statistics_bytes
from .strategy import choose_step


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
            `config.layer_groups > 1` it is iterated once per group: each pass restores the RNG
            states the first pass started from (the loader's generators, torch's, Python's and
            NumPy's global RNGs), so shuffling and augmentations repeat, and must then yield the
            same batches as the first pass (checked by hash).
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

    Raises:
        ValueError: no target, a one-shot iterator with `layer_groups > 1`, or the true Fisher with
            a `loss_fn` but no `sample_fn`. StatisticsError: a targeted weight is partitioned or not
            materialized (before any batch), a pass saw other batches than the first, or the data
            gave no usable statistic.
    """
    if not targets:
        raise ValueError("no layer to collect statistics for: the model has no targeted layer")
    for target in targets:
        check_materialized(target.name, target.weight_module, target.layer_type)
    step = choose_step(model, config, loss_fn, sample_fn)
    groups = layer_groups(targets, config, with_grad_mean)
    if len(groups) > 1:
        if isinstance(dataloader, Iterator):
            raise ValueError(
                f"FisherConfig.layer_groups={config.layer_groups} makes one pass over the data per group of layers, "
                f"but the dataloader is a one-shot iterator ({type(dataloader).__name__}); pass a list of batches, "
                "a DataLoader or another re-iterable, or set layer_groups=1"
            )
    dtype = str(weight_matrix(targets[0].weight_module, targets[0].layer_type).dtype)
    passes = SamePasses(dataloader, config.num_batches, len(groups)) if len(groups) > 1 else None
    layers: dict[str, LayerStats] = {}
    batches_per_pass: int | None = None
    world_size = 1
    try:
        for index, group in enumerate(groups):
            accumulators = [LayerAccumulator.create(target, with_grad_mean, config) for target in group]
            description = "Fisher statistics" if len(groups) == 1 else f"Fisher statistics {index + 1}/{len(groups)}"
            local_batches = collect_pass(model, accumulators, passes or dataloader, config, step, description)
            batches, world_size = all_reduce(accumulators, local_batches)
            if batches == 0:
                raise StatisticsError("the dataloader yielded no batches: cannot collect Fisher statistics")
            if batches_per_pass is not None and batches != batches_per_pass:
                raise StatisticsError(
                    f"the dataloader yielded {batches_per_pass} batches in the first pass and {batches} in pass "
                    f"{index + 1}; layer_groups > 1 needs the same batches in every pass"
                )
            batches_per_pass = batches
            for accumulator in accumulators:
                layers[accumulator.name] = accumulator.finalize(batches, config.stats_device)
            del accumulators
    finally:
        if passes is not None:
            passes.finish()
    assert batches_per_pass is not None
    return FisherStats(layers=layers, fisher=config.fisher, num_batches=batches_per_pass,
                       n_samples=config.n_samples if config.fisher == "true" else 1,
                       model_dtype=dtype, world_size=world_size)


__all__ = ["IGNORE_INDEX", "StatisticsError", "TargetLayer", "collect_statistics", "layer_groups"]
