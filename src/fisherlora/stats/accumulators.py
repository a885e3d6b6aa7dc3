"""Running sums of one layer's Kronecker factors, and their all-reduce over `torch.distributed` ranks.

A factor `sum_t x_t x_t^T` is summed densely (`DenseSum`, `d x d` float32) or, for a dimension above
`FisherConfig.sketch_threshold`, streamed into a Nystrom sketch (`sketch.NystromSketch`, `d * k`
floats); both sit behind the `FactorSum` interface, so the collection never asks which one it has.
`LayerAccumulator` holds one layer's two factor sums, the optional `M = sum_t g_t x_t^T` and the
token/example counts, and turns them into a `LayerStats` at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from ..config import FisherConfig
from .container import LayerStats, weight_fingerprint
from .errors import StatisticsError
from .layers import TargetLayer, module_weight, weight_matrix
from .sketch import LowRankFactor, NystromSketch, sketch_seed, sketched_rank


class FactorSum(Protocol):
    """A running `sum_t x_t x_t^T` over rows `x_t` of dimension `d`."""

    def add(self, rows: torch.Tensor) -> None:
        """Add the outer products of `rows`, `(N, d)` float32."""

    def finite(self) -> bool:
        """False once a non-finite row was added (checked in `O(d)`, not over the rows)."""

    def reduce_tensors(self) -> list[torch.Tensor]:
        """The tensors whose element-wise sum over ranks is the sum over all ranks' rows."""

    def nbytes(self) -> int:
        """Bytes held."""

    def finalize(self, count: int) -> torch.Tensor | LowRankFactor:
        """The factor `sum / count`: a dense `(d, d)` float32 tensor or a `LowRankFactor`."""


# Column blocks of a dense sum: only the blocks on and above the diagonal are accumulated (the
# sum is symmetric), which halves the work for wide factors. On a 1-thread CPU (MKL, AVX2) with
# the ~230 rows of a calibration batch, 128 beat 192 by 2-12% for d = 384 (3 blocks: 0.67 of a full
# product instead of 0.75) and tied it for d = 1536 (0.54 vs 0.56); 64 and 96 were no faster.
_TRIANGLE_BLOCK = 128


def block_bounds(dim: int, block: int = _TRIANGLE_BLOCK) -> list[int]:
    """Boundaries `[0, b, 2b, ..., dim]` of the column blocks (a last block under `block / 2` wide
    is merged into the one before)."""
    bounds = list(range(0, dim, block)) + [dim]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < block // 2:
        bounds.pop(-2)
    return bounds


class DenseSum:
    """`sum_t x_t x_t^T` as a dense `(d, d)` float32 matrix.

    Accumulated block-upper-triangular (`block_bounds`): the blocks below the diagonal stay zero
    until `finalize` mirrors the upper ones into them.
    """

    def __init__(self, dim: int, device: torch.device) -> None:
        self.total = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.bounds = block_bounds(dim)
        self.result: torch.Tensor | None = None
        self.count: int | None = None

    def add(self, rows: torch.Tensor) -> None:
        if self.result is not None:
            raise RuntimeError("a finalized DenseSum cannot be added to")
        for start, end in zip(self.bounds[:-1], self.bounds[1:], strict=True):
            self.total[start:end, start:].addmm_(rows[:, start:end].T, rows[:, start:])

    def finite(self) -> bool:
        # A non-finite entry of any added row makes its column's diagonal sum inf or NaN: O(d). The
        # float64 sum of d float32 entries cannot overflow, so it is finite iff every entry is; one
        # reduction, where isfinite().all() is two with a temporary (about 2.5x the time on CPU).
        return math.isfinite(float(self.total.diagonal().sum(dtype=torch.float64)))

    def reduce_tensors(self) -> list[torch.Tensor]:
        return [self.total]

    def nbytes(self) -> int:
        return self.total.numel() * self.total.element_size()

    def finalize(self, count: int) -> torch.Tensor:
        """The symmetric `sum / count`, in place (no second `d x d` copy); a second call returns the
        same tensor (layers that share this sum finalize it once)."""
        if self.result is None:
            for start, end in zip(self.bounds[1:-1], self.bounds[2:], strict=True):
                self.total[start:end, :start] = self.total[:start, start:end].T
            self.result, self.count = self.total.div_(count), count
        elif count != self.count:
            raise RuntimeError(f"a DenseSum finalized with {self.count} rows is finalized again with {count}")
        return self.result


def factor_sum(dim: int, device: torch.device, config: FisherConfig, name: str, side: str) -> FactorSum:
    """A dense sum, or a sketch when `dim > config.sketch_threshold` (seeded per layer and side)."""
    rank = sketched_rank(dim, config.sketch_threshold, config.sketch_rank)
    if rank is None:
        return DenseSum(dim, device)
    return NystromSketch(dim, rank, sketch_seed(config.sketch_seed, name, side), device)


@dataclass
class LayerAccumulator:
    """One layer's sums: `A` over input rows, `G` over output-gradient rows, optionally `M`.

    `tokens_forward`/`examples_forward` count what entered `A`, `tokens_backward`/`examples_backward`
    what entered `G` and `M` (they differ when the true Fisher repeats a forward per label draw).
    """

    target: TargetLayer
    act_sum: FactorSum
    grad_sum: FactorSum
    grad_mean_sum: torch.Tensor | None
    tokens_forward: int = 0
    tokens_backward: int = 0
    examples_forward: int = 0
    examples_backward: int = 0

    @classmethod
    def create(cls, target: TargetLayer, with_grad_mean: bool, config: FisherConfig) -> LayerAccumulator:
        weight = weight_matrix(target.weight_module, target.layer_type)
        d_out, d_in = weight.shape
        device = weight.device
        return cls(
            target=target,
            act_sum=factor_sum(d_in, device, config, target.name, "act"),
            grad_sum=factor_sum(d_out, device, config, target.name, "grad"),
            grad_mean_sum=torch.zeros(d_out, d_in, dtype=torch.float32, device=device) if with_grad_mean else None,
        )

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def device(self) -> torch.device:
        return module_weight(self.target.weight_module).device

    def add_inputs(self, rows: torch.Tensor, examples: int, batch_index: int, add_to_sum: bool = True) -> None:
        """Add kept input rows `x_t` `(N, d_in)` float32 of `examples` examples to `A` (only count
        them with `add_to_sum=False`: another layer sharing this `A` sum adds them)."""
        if add_to_sum:
            self.act_sum.add(rows)
            if not self.act_sum.finite():
                raise StatisticsError(f"non-finite input to module {self.name!r} at batch {batch_index}")
        self.tokens_forward += rows.shape[0]
        self.examples_forward += examples

    def add_output_gradients(self, rows: torch.Tensor | None, kept_rows: torch.Tensor | None, kept_tokens: int,
                             inputs: torch.Tensor, examples: int, batch_index: int) -> None:
        """Add output-gradient rows `g_t` `(N, d_out)` float32 (None: the output does not reach the
        loss, `g_t = 0`) to `G` at the kept rows (`kept_rows` `(K,)` int64 row indices, None: all;
        `kept_tokens` of them), and `g_t x_t^T` to `M` at all `N` rows, with the input rows `inputs`
        `(N, d_in)`.

        `M` sums to the weight gradient `dL/dW`: rows without a loss term of their own reach the
        loss through attention, and padding rows add `g_t = 0`.
        """
        self.tokens_backward += kept_tokens
        self.examples_backward += examples
        if rows is None:
            return
        kept = _nonzero_rows(rows.index_select(0, kept_rows) if kept_rows is not None else rows)
        if kept.shape[0] > 0:
            self.grad_sum.add(kept)
            if not self.grad_sum.finite():
                raise StatisticsError(f"non-finite output gradient at module {self.name!r} at batch {batch_index}")
        if self.grad_mean_sum is not None:
            live = nonzero_row_index(rows)
            if live is not None:
                rows, inputs = rows.index_select(0, live), inputs.index_select(0, live)
            self.grad_mean_sum.addmm_(rows.T, inputs)

    def reduce_tensors(self) -> list[torch.Tensor]:
        tensors = self.act_sum.reduce_tensors() + self.grad_sum.reduce_tensors()
        return tensors + ([self.grad_mean_sum] if self.grad_mean_sum is not None else [])

    def finalize(self, batches: int, device: str | None = None) -> LayerStats:
        """`A = sum / T`, `G = sum / T`, `M = sum / E` as a `LayerStats` (moved to `device` if given).

        Raises:
            StatisticsError: no token was kept, or a statistic is not finite.
        """
        if self.tokens_forward == 0 or self.tokens_backward == 0:
            raise StatisticsError(
                f"module {self.name!r} saw no unmasked token in {batches} batches (every position had "
                "attention_mask == 0 or labels == -100, or the module was never called)"
            )
        act_cov = self.act_sum.finalize(self.tokens_forward)
        grad_cov = self.grad_sum.finalize(self.tokens_backward)
        grad_mean = None
        if self.grad_mean_sum is not None:
            grad_mean = self.grad_mean_sum.div_(max(self.examples_backward, 1))
        # A sum of outer products x x^T has |F_ij| <= sqrt(F_ii F_jj): its diagonal is finite iff all of it is.
        checks = (("act_cov", _diagonal_of(act_cov)), ("grad_cov", _diagonal_of(grad_cov)), ("grad_mean", grad_mean))
        for label, statistic in checks:
            if not _finite(statistic):
                raise StatisticsError(f"statistic {label} of module {self.name!r} is not finite")
        if device is not None:
            act_cov, grad_cov = act_cov.to(device), grad_cov.to(device)
            grad_mean = grad_mean.to(device) if grad_mean is not None else None
        weight = weight_matrix(self.target.weight_module, self.target.layer_type)
        return LayerStats(
            act_cov=act_cov,
            grad_cov=grad_cov,
            grad_mean=grad_mean,
            num_tokens=self.tokens_forward,
            num_examples=self.examples_forward,
            layer_type=self.target.layer_type,
            weight_shape=(int(weight.shape[0]), int(weight.shape[1])),
            fingerprint=weight_fingerprint(weight),
        )


def nonzero_row_index(rows: torch.Tensor) -> torch.Tensor | None:
    """The indices `(K,)` int64 of the rows of `rows` `(N, d)` with a nonzero (or NaN) entry, or None
    when every row has one.

    A row of zeros adds nothing to `G` or `M`, and whole layers produce them: in a sequence
    classifier only the pooled position of the last block reaches the loss, so that block's
    output gradients are zero at every other position. Dropping them leaves the sums unchanged
    and saves their share of the products. Exact and cheap: only rows whose first entry is zero
    are candidates (none, for a dense gradient), and only those are read in full.
    """
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        return None
    candidates = (rows[:, 0] == 0).nonzero().squeeze(1)
    if candidates.shape[0] == 0:
        return None
    zero = rows.index_select(0, candidates).abs().amax(1) == 0  # NaN != 0: a NaN row is kept
    if not bool(zero.any()):
        return None
    live = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
    live[candidates[zero]] = False
    return live.nonzero().squeeze(1)


def _nonzero_rows(rows: torch.Tensor) -> torch.Tensor:
    index = nonzero_row_index(rows)
    return rows if index is None else rows.index_select(0, index)


def _diagonal_of(factor: torch.Tensor | LowRankFactor) -> torch.Tensor | LowRankFactor:
    return factor.diagonal() if isinstance(factor, torch.Tensor) else factor


def _finite(statistic: torch.Tensor | LowRankFactor | None) -> bool:
    if statistic is None:
        return True
    if isinstance(statistic, LowRankFactor):
        return bool(torch.isfinite(statistic.eigenvectors).all() and torch.isfinite(statistic.eigenvalues).all()
                    and math.isfinite(statistic.trace))
    return bool(torch.isfinite(statistic).all())


def all_reduce(accumulators: list[LayerAccumulator], batches: int) -> tuple[int, int]:
    """Sum statistics and counts over `torch.distributed` ranks (a no-op without it).

    Dense factors, sketches (`Y` and the trace: every rank regenerates the same test matrix from the
    seed), `M` and the token/example/batch counts are summed, so every rank finalizes identical
    statistics. Returns `(total batches, world size)`.
    """
    import torch.distributed as distributed

    if not (distributed.is_available() and distributed.is_initialized()):
        return batches, 1
    reduced: set[int] = set()
    for accumulator in accumulators:
        for tensor in accumulator.reduce_tensors():
            if id(tensor) not in reduced:  # a sum shared by layers reading one tensor is reduced once
                reduced.add(id(tensor))
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
