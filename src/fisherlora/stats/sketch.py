"""Low-rank (Nystrom) sketches of the Kronecker factors, for layers too wide for a dense `d x d` factor.

A factor `F = (1/T) sum_t x_t x_t^T` is streamed into `Y = sum_t x_t (x_t^T Omega)`, `(d, k)` float32,
with a fixed Gaussian test matrix `Omega` `(d, k)` regenerated from a seed whenever it is needed (so it is
never stored, and is identical on every rank), plus the exact trace `sum_t ||x_t||^2`. At the end the
Nystrom approximation `F_k = Y (Omega^T Y)^+ Y^T` is formed in eigen-pair form `U diag(lambda) U^T`
(stabilized as in Tropp et al., "Fixed-rank approximation of a positive-semidefinite matrix from
streaming data", NeurIPS 2017). It is exact when `k = d`.

The trace not captured by `F_k` is spread evenly over the orthogonal complement of `U` (an isotropic
tail), so `LowRankFactor` represents

    F ~= U diag(lambda) U^T + tail * (I - U U^T),   tail = (trace - sum(lambda)) / (d - k),

which keeps `trace(F)` (hence `mean(diag F)`, the scale of the damping) exact and is never further
from `F` in Frobenius norm than `F_k` alone when the tail lies in the complement. Memory: `U` holds
`d * k` floats; the accumulator holds `Y` (`d * k` floats) and `Omega` only transiently.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .top_r import signed_columns

# Relative shift of the stabilized Nystrom reconstruction: Y is accumulated in float32, so its
# rounding noise is ~1e-7 relative; the shift must exceed it for the Cholesky factor to exist.
_SHIFT = 4 * torch.finfo(torch.float32).eps
# Columns of the test matrix are drawn in blocks of this many, one seed per block (see gaussian_test_matrix).
_BLOCK = 64
_BLOCK_STRIDE = 0x9E3779B1


@dataclass
class LowRankFactor:
    """A PSD factor `F ~= U diag(eigenvalues) U^T + tail * (I - U U^T)`, `(d, d)`, stored in `O(k d)`.

    Attributes:
        eigenvectors: `U`, `(d, k)` with orthonormal columns, float32.
        eigenvalues: `(k,)` descending, non-negative, float32.
        trace: the exact trace of `F` (`sum_t ||x_t||^2 / T`); the part not held by the eigenvalues
            is the isotropic `tail` on the complement of `U`.
    """

    eigenvectors: torch.Tensor
    eigenvalues: torch.Tensor
    trace: float

    @property
    def dim(self) -> int:
        return int(self.eigenvectors.shape[0])

    @property
    def rank(self) -> int:
        return int(self.eigenvectors.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    @property
    def device(self) -> torch.device:
        return self.eigenvectors.device

    @property
    def tail(self) -> float:
        """Eigenvalue given to every direction orthogonal to `U` (0 when `k = d`)."""
        missing = self.dim - self.rank
        if missing <= 0:
            return 0.0
        return max(self.trace - float(self.eigenvalues.double().sum()), 0.0) / missing

    def numel(self) -> int:
        """Floats held: `d * k + k`."""
        return self.eigenvectors.numel() + self.eigenvalues.numel()

    def to(self, device: torch.device | str | None) -> LowRankFactor:
        if device is None:
            return self
        return LowRankFactor(self.eigenvectors.to(device), self.eigenvalues.to(device), self.trace)

    def dense(self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
        """The `(d, d)` matrix `U diag(lambda) U^T + tail (I - U U^T)`."""
        return _spectral_function(self, lambda values: values, dtype, device)

    def leading_eigenpairs(self, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The `count` leading eigenpairs of the factor, read off the sketch: `lambda[:count]` `(count,)`
        descending and `U[:, :count]` `(d, count)`, float64, each vector with its largest-magnitude
        entry positive (`top_r`'s convention). None when the sketch does not hold them: `count > k`, or
        the tail eigenvalue is not below `lambda[count - 1]` (then tail directions tie for the top).

        These are the eigenpairs of `dense()` up to the float32 orthonormality of `U` (~1e-7), without
        forming the `(d, d)` matrix or iterating on it.

        Raises:
            ValueError: `count < 1`.
        """
        if count < 1:
            raise ValueError(f"leading_eigenpairs needs count >= 1, got {count}")
        if count > self.rank or (self.rank < self.dim and not float(self.eigenvalues[count - 1]) > self.tail):
            return None
        vectors = signed_columns(self.eigenvectors[:, :count].double())
        return self.eigenvalues[:count].double(), vectors

    def weight_gram(self, matrix: torch.Tensor, amount: float, dtype: torch.dtype) -> torch.Tensor:
        """`M^T (F + amount I) M` `(n, n)` float64, symmetric, for `M` `(d, n)`, without forming `F`:
        `F + delta I = U (lambda - tail) U^T + (tail + delta) I`, so it is `P^T diag(lambda - tail) P +
        (tail + delta) M^T M` with `P = U^T M` `(k, n)`: `d n (k + n)` multiply-adds instead of the dense
        `d n (d + n)` of `weight_gram.weight_gram` (the same matrix up to rounding). Products in `dtype`."""
        matrix = matrix.to(dtype)
        vectors = self.eigenvectors.to(device=matrix.device, dtype=dtype)
        tail = self.tail
        projected = vectors.T @ matrix
        excess = self.eigenvalues.to(device=matrix.device, dtype=dtype) - tail
        gram = (projected.T * excess) @ projected
        gram.add_(matrix.T @ matrix, alpha=tail + amount)
        gram = gram.double()
        return 0.5 * (gram + gram.T)

    def roots(self, damping: float, device: torch.device | str | None = None) -> LowRankRoots:
        """Roots of the damped factor, like `linalg.symmetric_roots` on `dense()` but kept in low-rank
        form (`LowRankRoots`): `O(d k)` floats, and `O(d k n)` to apply to `n` columns.

        The damping is `damping * trace / d` (`trace / d` is `mean(diag F)`), the eigenvalue floor
        the same relative `1e-12` as `symmetric_roots`: `F^{+-1/2} = U f(lambda + delta) U^T +
        f(tail + delta) (I - U U^T)`.

        Raises:
            ValueError: `damping < 0`.
        """
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        mean_diagonal = self.trace / self.dim
        amount = damping * (mean_diagonal if mean_diagonal > 0 else 1.0)
        values = self.eigenvalues.double() + amount
        has_tail = self.rank < self.dim
        tail = self.tail + amount
        largest = max(float(values.max()) if values.numel() else 0.0, tail if has_tail else 0.0)
        floor = max(largest, 1e-300) * 1e-12
        values = values.clamp_min(floor)
        tail = max(tail, floor)
        device = self.device if device is None else torch.device(device)
        return LowRankRoots(
            vectors=self.eigenvectors.to(device=device, dtype=torch.float64),
            root_values=values.sqrt().to(device), inverse_root_values=values.rsqrt().to(device),
            root_tail=tail**0.5 if has_tail else 0.0, inverse_root_tail=tail**-0.5 if has_tail else 0.0,
            damping_added=amount)


@dataclass(frozen=True)
class LowRankRoots:
    """Symmetric roots of a damped sketched factor, `F^{+-1/2} = U f U^T + c (I - U U^T)`, kept as `U`,
    the `k` values `f` and the tail value `c` (see `LowRankFactor.roots`).

    Applying one to `X` `(d, n)` is `c X + U ((f - c) U^T X)`: `2 d k n` multiply-adds, where the dense
    `(d, d)` root costs `d^2 n` (12x more for `d = 1536`, `k = 64`) and `d^2` floats to hold. The same
    matrices as the dense roots of `dense()` (`linalg.symmetric_roots`) up to rounding.

    Attributes:
        vectors: `U` `(d, k)` float64, orthonormal columns.
        root_values, inverse_root_values: `sqrt(lambda + delta)` and its reciprocal, `(k,)` float64.
        root_tail, inverse_root_tail: the same of the tail eigenvalue; 0 when `k = d` (no tail).
        damping_added: the absolute `delta` added to the eigenvalues.
    """

    vectors: torch.Tensor
    root_values: torch.Tensor
    inverse_root_values: torch.Tensor
    root_tail: float
    inverse_root_tail: float
    damping_added: float

    def _apply(self, values: torch.Tensor, tail: float, matrix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        matrix = matrix.to(dtype)
        vectors = self.vectors.to(dtype)
        result = vectors @ ((values.to(dtype) - tail)[:, None] * (vectors.T @ matrix))
        return result.add_(matrix, alpha=tail) if tail else result

    def root_times(self, matrix: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """`F^{1/2} X` for `X` `(d, n)`, computed in `dtype`."""
        return self._apply(self.root_values, self.root_tail, matrix, dtype)

    def inverse_root_times(self, matrix: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """`F^{-1/2} X` for `X` `(d, n)`, computed in `dtype`."""
        return self._apply(self.inverse_root_values, self.inverse_root_tail, matrix, dtype)

    @property
    def root(self) -> torch.Tensor:
        """`F^{1/2}` as a dense `(d, d)` float64 matrix (formed on each call)."""
        return self.root_times(torch.eye(self.vectors.shape[0], dtype=torch.float64, device=self.vectors.device))

    @property
    def inverse_root(self) -> torch.Tensor:
        """`F^{-1/2}` as a dense `(d, d)` float64 matrix (formed on each call)."""
        return self.inverse_root_times(torch.eye(self.vectors.shape[0], dtype=torch.float64,
                                                 device=self.vectors.device))


def _spectral_function(factor: LowRankFactor, function: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype,
                       device: torch.device | str | None, eigenvalues: torch.Tensor | None = None,
                       tail: float | None = None) -> torch.Tensor:
    """`U f(lambda) U^T + f(tail) (I - U U^T)` as a dense `(d, d)` matrix."""
    device = factor.device if device is None else torch.device(device)
    vectors = factor.eigenvectors.to(device=device, dtype=torch.float64)
    values = (factor.eigenvalues if eigenvalues is None else eigenvalues).to(device=device, dtype=torch.float64)
    tail_value = factor.tail if tail is None else tail
    mapped = function(values)
    matrix = torch.zeros(factor.dim, factor.dim, dtype=torch.float64, device=device)
    if factor.rank < factor.dim:
        mapped_tail = float(function(torch.tensor([tail_value], dtype=torch.float64))[0])
        matrix.diagonal().fill_(mapped_tail)
        mapped = mapped - mapped_tail
    matrix.addmm_(vectors * mapped, vectors.T)
    return matrix.to(dtype)


def sketch_seed(base_seed: int, layer_name: str, side: str) -> int:
    """Seed of one factor's test matrix: stable across processes and runs (unlike `hash`)."""
    return zlib.crc32(f"{base_seed}:{layer_name}:{side}".encode()) & 0x7FFFFFFF


def gaussian_test_matrix(dim: int, rank: int, seed: int, device: torch.device | str) -> torch.Tensor:
    """The Gaussian test matrix `Omega` `(d, k)` float32, regenerated from `seed` on `device`.

    Drawn in blocks of `_BLOCK` columns, each from its own seed, so the test matrices of one seed are
    nested (`Omega_k` is the first `k` columns of `Omega_k'` for `k < k'`): the Nystrom part of the
    approximation then never gets worse as `k` grows.
    """
    blocks = []
    for block in range(-(-rank // _BLOCK)):
        generator = torch.Generator(device=device).manual_seed((seed + _BLOCK_STRIDE * block) % 2**62)
        blocks.append(torch.randn(_BLOCK, dim, generator=generator, device=device, dtype=torch.float32))
    return torch.cat(blocks)[:rank].T


class NystromSketch:
    """Streaming sketch of `F = (1/T) sum_t x_t x_t^T` in `d * k` floats (plus one float64 trace).

    `add(rows)` updates `Y += rows^T (rows Omega)` and the trace; `finalize(T)` returns the
    `LowRankFactor`. Sums of sketches with the same seed are sketches of the summed data, so
    `torch.distributed` ranks all-reduce `reduce_tensors()` and finalize identically.
    """

    def __init__(self, dim: int, rank: int, seed: int, device: torch.device | str) -> None:
        if rank < 1:
            raise ValueError(f"sketch rank must be >= 1, got {rank}")
        self.dim = dim
        self.rank = min(rank, dim)
        self.seed = seed
        self.device = torch.device(device)
        self.sketch = torch.zeros(dim, self.rank, dtype=torch.float32, device=self.device)
        self.trace = torch.zeros((), dtype=torch.float64, device=self.device)

    def test_matrix(self) -> torch.Tensor:
        """`Omega`, regenerated (never stored)."""
        return gaussian_test_matrix(self.dim, self.rank, self.seed, self.device)

    def add(self, rows: torch.Tensor) -> None:
        """Add the outer products of `rows` `(N, d)` float32."""
        self.sketch.addmm_(rows.T, rows @ self.test_matrix())
        # ||rows||_F^2 summed in float64 without a float64 copy of the rows: 2.2 against 8.5 ms for
        # rows.double().square().sum() at 1840 x 1536 on one CPU thread, where the whole add took 27.
        self.trace += torch.linalg.vector_norm(rows, dtype=torch.float64).square()

    def finite(self) -> bool:
        """False once a non-finite row was added (it makes the trace inf or NaN)."""
        return bool(torch.isfinite(self.trace))

    def reduce_tensors(self) -> list[torch.Tensor]:
        return [self.sketch, self.trace]

    def nbytes(self) -> int:
        return self.sketch.numel() * self.sketch.element_size() + self.trace.element_size()

    def finalize(self, count: int) -> LowRankFactor:
        """The `LowRankFactor` of `F = sum / count` (float64 reconstruction, float32 result).

        The sketch is released: a finalized accumulator holds nothing (and cannot be added to).
        """
        sketch, self.sketch = self.sketch, self.sketch.new_empty(0)
        return nystrom_factor(sketch.double().div_(count), self.test_matrix().double(), float(self.trace) / count)


def nystrom_factor(sketch: torch.Tensor, omega: torch.Tensor, trace: float) -> LowRankFactor:
    """Stabilized Nystrom reconstruction `Y (Omega^T Y)^+ Y^T = U diag(lambda) U^T` from `Y = F Omega`.

    Shift `Y_nu = Y + nu Omega` (a sketch of `F + nu I`), Cholesky `C C^T = Omega^T Y_nu`,
    `E = Y_nu C^{-T}`, `U S _ = svd(E)`, `lambda = max(S^2 - nu, 0)`; `nu` grows until the
    Cholesky factor exists (the float32 sums can make `Omega^T Y` slightly indefinite).

    Args:
        sketch: `Y`, `(d, k)`. omega: `Omega`, `(d, k)`. trace: exact `trace(F)`.
    """
    sketch = sketch.double()
    omega = omega.double()
    scale = float(torch.linalg.matrix_norm(sketch, ord="fro"))
    if scale == 0.0 or not torch.isfinite(sketch).all():
        rank = sketch.shape[1]
        eye = torch.eye(sketch.shape[0], rank, dtype=torch.float32, device=sketch.device)
        values = torch.zeros(rank, dtype=torch.float32, device=sketch.device)
        if not torch.isfinite(sketch).all():
            values = values + float("nan")
        return LowRankFactor(eye, values, trace)
    shift = _SHIFT * scale
    for _ in range(12):
        shifted = sketch + shift * omega
        core = omega.T @ shifted
        core = 0.5 * (core + core.T)
        cholesky, info = torch.linalg.cholesky_ex(core)
        if int(info) == 0:
            break
        shift *= 10
    else:  # pragma: no cover - only for pathological sketches
        raise FloatingPointError("the Nystrom core stayed indefinite; the statistics are not PSD")
    whitened = torch.linalg.solve_triangular(cholesky, shifted.T, upper=False).T  # Y_nu C^{-T}
    left, singular_values, _ = torch.linalg.svd(whitened, full_matrices=False)
    values = (singular_values.square() - shift).clamp_min(0)
    return LowRankFactor(left.float().contiguous(), values.float(), trace)


def sketched_rank(dim: int, threshold: int | None, rank: int) -> int | None:
    """`k` used for a factor of dimension `dim`, or None when it is kept dense (`dim <= threshold`)."""
    if threshold is None or dim <= threshold:
        return None
    return min(rank, dim)


def layer_statistics_bytes(d_out: int, d_in: int, threshold: int | None = None, rank: int = 256,
                           with_grad_mean: bool = False) -> int:
    """Bytes of one layer's statistics (float32): `A`, `G` dense (`d^2`) or sketched (`d k`), and `M`.

    The accumulators during collection have the same size (a sketch adds one float64 trace and
    its transient test matrix, `d k` floats, while a batch is being added).
    """
    total = 0
    for dim in (d_in, d_out):
        k = sketched_rank(dim, threshold, rank)
        total += dim * dim if k is None else dim * k + k
    if with_grad_mean:
        total += d_out * d_in
    return 4 * total


__all__ = ["LowRankFactor", "NystromSketch", "layer_statistics_bytes", "nystrom_factor", "sketch_seed",
           "sketched_rank", "gaussian_test_matrix"]
