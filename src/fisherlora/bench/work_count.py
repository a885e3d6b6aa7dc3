"""Multiply-adds in the targeted layers: what the Fisher statistics add to a forward+backward pass, by
arithmetic alone.

For a targeted layer `y = W x`, `W` `(d_out, d_in)`, one row `x_t` costs `d_in d_out` multiply-adds in
the forward pass and as many again for the input gradient `dL/dx_t = W^T g_t` in the backward pass.
The three ways of initializing that read gradients then cost, summed over the targeted layers
(`F = sum_l rows_l d_in d_out`):

- the forward+backward floor (`floor.py`): forward and input gradient, `2F`;
- PEFT's LoRA-GA: also the weight gradient `sum_t g_t x_t^T`, `3F`;
- the K-FAC statistics (Martens & Grosse 2015, eq. 1-3): forward and input gradient `2F`, plus the
  factor sums `S`: `A = sum_t x_t x_t^T` once per input tensor (layers that read one tensor share
  it: query/key/value, gate/up; `stats/shared_inputs.py`) and `G = sum_t g_t g_t^T` per layer, each
  `d (d + 1) / 2` per row (symmetric: only a triangle is needed), or `2 d k` for a factor kept as a
  rank-`k` Nystrom sketch (`Y += X^T (X Omega)`: two products of `d k` per row; a sketch is never
  shared); plus, where `M = sum_t g_t x_t^T` is collected, one weight gradient more (`d_in d_out`
  per row).

`(2F + S [+ M]) / 3F` and `(2F + S [+ M]) / 2F` are the time ratios against LoRA-GA and the floor
of a run in which these products are all the work and every multiply-add takes the same time. The
rest of the model (attention scores, embeddings, layer norms, the loss, the untargeted layers) costs
every method alike and pulls measured ratios from these towards 1: a ratio above 1 against LoRA-GA
means more arithmetic than LoRA-GA whatever the rest costs. How fast each product runs (a `d x d`
triangle in blocks, a `d x k` sketch and the forward's GEMMs differ) is not counted either.

The rows are those each sum takes in the statistics code: `A` and `G` only the rows with
a loss term, `G` and `M` only those with a nonzero output gradient; the forward, the backward and
LoRA-GA's weight gradient take every row, padding included. `FisherConfig.layer_groups > 1` (one
pass over the data per group of layers) is not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..stats.sketch import sketched_rank


@dataclass(frozen=True)
class LayerRows:
    """One targeted layer's shape and the rows each product takes, summed over the calibration batches.

    Attributes:
        name: module name.
        d_out, d_in: the `(d_out, d_in)` weight matrix (a convolution's unfolded one:
            `d_in = C_in kh kw`, one row per output position).
        rows: rows through the forward pass (every token, padding included).
        act_rows: rows added to `A` (those with a loss term).
        grad_rows: rows added to `G` per label draw (with a loss term and a nonzero output gradient).
        grad_mean_rows: rows added to `M` per label draw (with a nonzero output gradient).
        input_group: layers with the same (non-None) group read the same input tensor in every call,
            so one dense `A` sum serves them; None: a sum of its own.
    """

    name: str
    d_out: int
    d_in: int
    rows: int
    act_rows: int
    grad_rows: int
    grad_mean_rows: int
    input_group: int | None = None


@dataclass(frozen=True)
class StatisticsWork:
    """What a method's statistics collect (`FisherConfig` fields of the same names).

    Attributes:
        with_grad_mean: whether `M` is collected.
        sketch_threshold: factors wider than this are rank-`sketch_rank` sketches; None: all dense.
        sketch_rank: `k`, clipped to the factor's dimension.
        label_draws: backward passes per batch (`n_samples` of the true Fisher, else 1): each adds
            an input gradient, `G` and `M` again.
    """

    with_grad_mean: bool = False
    sketch_threshold: int | None = None
    sketch_rank: int = 256
    label_draws: int = 1


@dataclass(frozen=True)
class WorkCount:
    """Multiply-adds per token in the targeted layers (a token: a row of the layer with the most rows).

    Attributes:
        forward: `F`, the forward pass.
        floor: `2F`, forward and input gradient.
        lora_ga: `3F`, also the weight gradient.
        factors: `S`, the sums of `A` and `G`.
        grad_mean: the sum of `M` (0 when not collected).
        statistics: the whole statistics pass, `F + label_draws F + S + grad_mean`.
    """

    forward: float
    floor: float
    lora_ga: float
    factors: float
    grad_mean: float
    statistics: float

    @property
    def arithmetic_to_lora_ga(self) -> float:
        """The statistics pass's multiply-adds over LoRA-GA's."""
        return self.statistics / self.lora_ga if self.lora_ga else float("nan")

    @property
    def arithmetic_to_floor(self) -> float:
        """The statistics pass's multiply-adds over the floor's."""
        return self.statistics / self.floor if self.floor else float("nan")


def factor_work(dim: int, sketch_threshold: int | None, sketch_rank: int) -> int:
    """Multiply-adds per row of one factor sum of dimension `dim`: `d (d + 1) / 2` dense (a
    triangle), `2 d k` as a rank-`k` sketch (`stats.sketch.sketched_rank` decides which)."""
    rank = sketched_rank(dim, sketch_threshold, sketch_rank)
    return dim * (dim + 1) // 2 if rank is None else 2 * dim * rank


def count_work(layers: Sequence[LayerRows], statistics: StatisticsWork, tokens: int | None = None) -> WorkCount:
    """Multiply-adds per token of the floor, LoRA-GA and one method's statistics (see the module doc).

    Args:
        layers: the targeted layers.
        statistics: what the method collects.
        tokens: the divisor; None: the most `rows` of any layer (the tokens of a transformer).

    Raises:
        ValueError: no layer, a negative count, more statistics rows than forward rows, layers of
            one input group with different `d_in` or `act_rows`, or fewer than one label draw.
    """
    if not layers:
        raise ValueError("no targeted layer to count")
    if statistics.label_draws < 1:
        raise ValueError(f"label_draws must be >= 1, got {statistics.label_draws}")
    groups: dict[int, LayerRows] = {}
    for layer in layers:
        if min(layer.d_out, layer.d_in, layer.act_rows, layer.grad_rows, layer.grad_mean_rows) < 0 or \
                max(layer.act_rows, layer.grad_rows, layer.grad_mean_rows) > layer.rows:
            raise ValueError(f"layer {layer.name!r}: counts must be >= 0 and at most rows={layer.rows}: {layer}")
        if layer.input_group is not None:
            first = groups.setdefault(layer.input_group, layer)
            if (first.d_in, first.act_rows) != (layer.d_in, layer.act_rows):
                raise ValueError(f"layers {first.name!r} and {layer.name!r} share input group {layer.input_group} "
                                 f"but have d_in {first.d_in} vs {layer.d_in}, rows {first.act_rows} vs "
                                 f"{layer.act_rows}")
    divisor = tokens if tokens is not None else max(layer.rows for layer in layers)
    if divisor <= 0:
        raise ValueError(f"tokens must be > 0, got {divisor}")
    threshold, rank, draws = statistics.sketch_threshold, statistics.sketch_rank, statistics.label_draws
    forward = sum(layer.rows * layer.d_in * layer.d_out for layer in layers)
    added_groups: set[int] = set()
    factors = 0
    for layer in layers:
        act_dense = sketched_rank(layer.d_in, threshold, rank) is None
        if layer.input_group is None or not act_dense or layer.input_group not in added_groups:
            factors += layer.act_rows * factor_work(layer.d_in, threshold, rank)
            if layer.input_group is not None and act_dense:
                added_groups.add(layer.input_group)
        factors += draws * layer.grad_rows * factor_work(layer.d_out, threshold, rank)
    grad_mean = draws * sum(layer.grad_mean_rows * layer.d_in * layer.d_out for layer in layers) \
        if statistics.with_grad_mean else 0
    return WorkCount(forward=forward / divisor, floor=2 * forward / divisor, lora_ga=3 * forward / divisor,
                     factors=factors / divisor, grad_mean=grad_mean / divisor,
                     statistics=((1 + draws) * forward + factors + grad_mean) / divisor)


__all__ = ["LayerRows", "StatisticsWork", "WorkCount", "count_work", "factor_work"]
