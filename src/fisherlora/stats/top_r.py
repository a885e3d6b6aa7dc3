"""Top-`r` eigenvectors and singular triplets, for initializers that use only `r` directions.

A full eigendecomposition of a `(d, d)` factor costs `~9 d^3` flops in float64 whatever `r` is;
a block Krylov method costs `~2 d^2 p` per step for a block of `p` columns. Both routines here check
their result (eigen-residuals) and fall back to a dense float64 solve for the wanted pairs
(`subset_eigen`) when the check fails, so their answer is the dense solve's to the stated tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .subset_eigen import subset_eigenpairs

# Residual `||F v - lambda v|| <= TOLERANCE * lambda_max` of every returned eigenpair: the angle
# between the returned and the true top-`k` subspace is at most the residual over the eigengap at
# the cut (Davis-Kahan), so gaps down to ~1e-6 of lambda_max still agree to 1e-6. The floor of a
# float64 residual is ~1e-15 lambda_max, so the check stays reachable.
TOLERANCE = 1e-12
_EXTRA_COLUMNS = 4  # the block holds `count + max(4, count // 2)` columns: the extra ones speed convergence
_MAX_STEPS = 15
_MIN_STEPS = 6
_BASIS_FRACTION = 3  # the Krylov basis stays below a third of `d`: beyond, a full eigh costs less
_ROUNDS = 4
# On a CPU the block Krylov method runs on an explicit matrix only above this width: below, LAPACK's subset solver
# (`subset_eigen`) is faster. Measured on one thread, 8 pairs, `logspace(0, -3)` spectrum, median of 3
# alternating (two benchmark processes sharing the cores): Krylov / subset solver 25.5 / 9.6 ms at
# d = 384, 97 / 26 at 576, 197 / 34 at 768, 358 / 115 at 1024; at 1536, 173 ms for a Krylov round
# that gave up (a full solve followed) against 371 ms; a nearly flat top (the whitened gradients of
# MiniLM, 384 wide, 37 layers): 2.05 s against 0.69 s with the same pairs to 1.5e-12.
KRYLOV_MIN_DIM = 1024
# Rayleigh-Ritz after steps 5, 7, 9, ... and the round's last: none converged sooner on the models
# measured, and a check (an eigh of the projected matrix, up to 192 wide) costs about what one more
# step does (SmolLM2's factors and Gram matrices: 10-25% less time than a check after every step).
_FIRST_CHECK = 5
_CHECK_EVERY = 2


def _checked(step: int, steps: int) -> bool:
    """Whether the block Krylov method checks its residual after `step` of a round of `steps`."""
    return step == steps or (step >= _FIRST_CHECK and (step - _FIRST_CHECK) % _CHECK_EVERY == 0)


def krylov_steps(dim: int, block: int) -> int:
    """Steps per round of the block Krylov method for a `(dim, dim)` matrix and `block` columns:
    as many as keep the basis, `block * (steps + 1)` columns, below `dim / 3` (at most 15); 0 when
    fewer than 6 fit, where the full decomposition is as cheap (measured: `d = 384` with 8 pairs
    takes 9 steps and half the time of `eigh`, with 16 pairs 4 steps that often do not converge)."""
    steps = min(_MAX_STEPS, dim // (_BASIS_FRACTION * block) - 1)
    return steps if steps >= _MIN_STEPS else 0


@dataclass(frozen=True)
class SymmetricOperator:
    """A symmetric positive semi-definite `(d, d)` matrix `F` given by its products, so that the block
    Krylov method never needs `F` itself (e.g. `C = R^T F R` applied as three products, without
    forming the congruence).

    Attributes:
        dim: `d`.
        apply: `X (d, p) -> F X (d, p)`, float64.
        dense: returns `F` `(d, d)` float64, for the dense solve (called only when the Krylov
            method is not used or does not converge).
        device: where the products are formed.
        explicit: `F` is held already (`of`): `dense` costs nothing, so a CPU takes the dense solve up to
            `KRYLOV_MIN_DIM` wide; an implicit operator is iterated wherever the basis fits, since
            forming it costs `~d^3` (the weight spectra of `fisher_svd` converge in one round).
    """

    dim: int
    apply: Callable[[torch.Tensor], torch.Tensor]
    dense: Callable[[], torch.Tensor]
    device: torch.device
    explicit: bool = False

    @classmethod
    def of(cls, matrix: torch.Tensor) -> SymmetricOperator:
        """The operator of an explicit symmetric `(d, d)` matrix (converted to float64 once)."""
        matrix = matrix.double()
        return cls(matrix.shape[0], matrix.__matmul__, lambda: matrix, matrix.device, explicit=True)


def dense_solve_preferred(dim: int, device: torch.device) -> bool:
    """Whether LAPACK's subset solver beats the block Krylov method on an explicit `(dim, dim)` matrix
    on `device`: on a CPU up to `KRYLOV_MIN_DIM` wide (measured there only)."""
    return device.type == "cpu" and dim <= KRYLOV_MIN_DIM


def top_eigenpairs(factor: torch.Tensor | SymmetricOperator, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading eigenpairs of a symmetric positive semi-definite matrix, in float64.

    Block Lanczos with full re-orthogonalization: the basis `Q_0, ..., Q_s` with `Q_0` an
    orthonormal block of `count + max(4, count // 2)` columns (a fixed seed) and `Q_{j+1}` the
    part of `F Q_j` orthogonal to the blocks before it, and Rayleigh-Ritz on the basis (whose
    products with `F` the iteration has already formed) after steps 5, 7, 9, ... (`_checked`): it stops
    as soon as every wanted pair's residual is below `TOLERANCE * lambda_max`, else restarts from the
    leading Ritz vectors after `krylov_steps` steps (one round, 6 to 11 steps, on the factors and
    Gram matrices of the models measured). A dense solve of the wanted pairs instead
    (`subset_eigen.subset_eigenpairs`, LAPACK's subset solver on a CPU): for an explicit matrix on a
    CPU up to `KRYLOV_MIN_DIM` wide, when fewer than 6 steps fit in a basis of a third of `d`
    (`krylov_steps`), or as soon as the residual after round `j` is above
    `TOLERANCE ** (j / 4) * lambda_max` (not on course to converge in 4 rounds: an eigengap at the
    cut too small for the Krylov method, e.g. the nearly flat top of a whitened gradient of few
    examples; one round is lost).

    Args:
        factor: symmetric PSD `(d, d)`, any float dtype, or a `SymmetricOperator`.
        count: `k <= d` pairs.

    Returns:
        eigenvalues `(k,)` descending and eigenvectors `(d, k)` as columns (float64), each with its
        largest-magnitude entry positive.
    """
    operator = factor if isinstance(factor, SymmetricOperator) else SymmetricOperator.of(factor)
    found = _krylov(operator, count)
    return found if found is not None else _full(operator.dense(), count)


def bottom_eigenpairs(matrix: torch.Tensor, count: int, upper: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The `count` smallest eigenpairs of a symmetric `(d, d)` matrix `F` whose eigenvalues are all at
    most `upper`: the leading ones of the PSD `upper I - F` by the block Krylov method of
    `top_eigenpairs` (the same check), else those of a dense float64 solve of `F` itself (not of the
    shifted matrix, whose larger norm would cost accuracy when `upper >> ||F||`).

    Returns:
        eigenvalues `(k,)` ascending and eigenvectors `(d, k)` (float64), each with its
        largest-magnitude entry positive.
    """
    matrix = 0.5 * (matrix + matrix.T).double()
    shifted = -matrix
    shifted.diagonal().add_(upper)
    found = _krylov(SymmetricOperator.of(shifted), count)
    if found is not None:
        return upper - found[0], found[1]
    values, vectors = subset_eigenpairs(matrix, 0, count - 1)
    return values, signed_columns(vectors)


def _krylov(operator: SymmetricOperator, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`top_eigenpairs` by block Lanczos, or None where the dense solve is cheaper or the
    iteration does not converge. The basis `Q`, its products `F Q` and `Q^T F Q` grow by a block each
    step inside buffers allocated once per call."""
    dim = operator.dim
    block = count + max(_EXTRA_COLUMNS, count // 2)
    steps = krylov_steps(dim, block)
    if steps == 0 or (operator.explicit and dense_solve_preferred(dim, operator.device)):
        return None
    generator = torch.Generator(device="cpu").manual_seed(0)
    start = torch.randn(dim, block, generator=generator, dtype=torch.float64).to(operator.device)
    width = block * (steps + 1)
    bases = torch.empty(dim, width, dtype=torch.float64, device=operator.device)
    products = torch.empty_like(bases)
    projected = torch.empty(width, width, dtype=torch.float64, device=operator.device)
    for done in range(1, _ROUNDS + 1):
        bases[:, :block] = torch.linalg.qr(start)[0]
        products[:, :block] = operator.apply(bases[:, :block])
        projected[:block, :block] = bases[:, :block].T @ products[:, :block]
        for step in range(steps + 1):
            size = block * (step + 1)
            basis, product = bases[:, :size], products[:, :size]
            if _checked(step, steps):
                values, vectors, residual = _rayleigh_ritz(basis, product, projected[:size, :size], count)
                scale = max(float(values[0]), 1e-300)
                if residual <= TOLERANCE * scale:
                    return values[:count], signed_columns(basis @ vectors[:, :count])
            if step == steps:
                break
            new = bases[:, size:size + block]
            new.copy_(_orthogonal_block(basis, products[:, size - block:size]))  # from F Q_j of the newest block
            last = products[:, size:size + block]
            last.copy_(operator.apply(new))
            cross = basis.T @ last
            projected[:size, size:size + block] = cross
            projected[size:size + block, :size] = cross.T
            projected[size:size + block, size:size + block] = new.T @ last
        if residual > TOLERANCE ** (done / _ROUNDS) * scale:  # too slow to converge in the rounds left
            return None
        start = basis @ vectors[:, :block]
    return None


def _rayleigh_ritz(basis: torch.Tensor, product: torch.Tensor, projected: torch.Tensor,
                   count: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Ritz values (descending) and vectors (in basis coordinates) of the projected matrix, and the
    largest residual `||F Q y - theta Q y||` of the leading `count` pairs."""
    values, vectors = torch.linalg.eigh(0.5 * (projected + projected.T))
    values, vectors = values.flip(0), vectors.flip(1)
    wanted = vectors[:, :count]
    residual = float((product @ wanted - (basis @ wanted) * values[:count]).norm(dim=0).max())
    return values, vectors, residual


def _orthogonal_block(basis: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """An orthonormal block spanning the part of `candidates` `(d, p)` orthogonal to the orthonormal
    `basis` `(d, m)` (projected twice: once is not enough in floating point)."""
    candidates = candidates - basis @ (basis.T @ candidates)
    candidates = candidates - basis @ (basis.T @ candidates)
    block = torch.linalg.qr(candidates)[0]
    if float((basis.T @ block).abs().max()) <= 1e-10:
        return block
    # The candidates are (partly) in the basis' span already (an invariant subspace reached, a
    # rank-deficient matrix): QR of that rounding noise is not orthogonal to the basis. Householder
    # QR of the whole is: its new columns are orthonormal directions outside the span.
    return torch.linalg.qr(torch.cat([basis, candidates], dim=1))[0][:, basis.shape[1]:]


def _full(matrix: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    dim = matrix.shape[0]
    values, vectors = subset_eigenpairs(matrix, dim - count, dim - 1)
    return values.flip(0), signed_columns(vectors.flip(1))


def signed_columns(vectors: torch.Tensor) -> torch.Tensor:
    """Each column with its largest-magnitude entry positive: a sign fixed by the matrix, not by the
    solver (an eigenvector's sign is otherwise arbitrary)."""
    largest = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors.gather(0, largest[None, :]))
    return vectors * torch.where(signs == 0, torch.ones_like(signs), signs)


def top_singular_triplets(matrix: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading singular triplets of `M` `(m, n)` in float64, from the eigenpairs of the smaller Gram
    matrix (`M^T M` or `M M^T`, `min(m, n)` wide) instead of a full SVD.

    The Gram matrix squares the condition number: triplets with `sigma_k < 1e-4 sigma_1` (whose
    vectors it would resolve only to `~eps sigma_1^2 / sigma_k^2`) are taken from a full SVD instead.

    Returns:
        `U_k` `(m, k)`, `S_k` `(k,)` descending, `V_k` `(n, k)`.
    """
    matrix = matrix.double()
    tall = matrix.shape[0] >= matrix.shape[1]
    small = matrix.T if tall else matrix  # (min, max)
    values, vectors = top_eigenpairs(small @ small.T, count)
    singular_values = values.clamp_min(0).sqrt()
    if float(singular_values[-1]) <= 1e-4 * float(singular_values[0]):  # also a zero matrix
        left, full_values, right_transposed = torch.linalg.svd(matrix, full_matrices=False)
        return left[:, :count], full_values[:count], right_transposed[:count].T
    other = (small.T @ vectors) / singular_values  # the larger side's vectors
    return (other, singular_values, vectors) if tall else (vectors, singular_values, other)
