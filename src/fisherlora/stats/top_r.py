"""Top-`r` eigenvectors and singular triplets, for initializers that use only `r` directions.

A full eigendecomposition of a `(d, d)` factor costs `~9 d^3` flops in float64 whatever `r` is;
a block Krylov method costs `~2 d^2 p` per step for a block of `p` columns. Both routines here check
their result (eigen-residuals) and fall back to the full float64 decomposition when the check
fails, so their answer is the full decomposition's to the stated tolerance, only cheaper.
"""

from __future__ import annotations

import torch

# Residual `||F v - lambda v|| <= TOLERANCE * lambda_max` of every returned eigenpair: the subspace
# angle error is at most the residual over the eigengap (Davis-Kahan), far below the 1e-6 relative
# agreement the initializers promise for gaps down to ~1e-4 of lambda_max.
TOLERANCE = 1e-10
_KRYLOV_STEPS = 10
_ROUNDS = 4


def top_eigenpairs(factor: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading eigenpairs of a symmetric positive semi-definite matrix, in float64.

    Block Krylov: the span of `X, F X, ..., F^10 X` for a block `X` of `count + 4` columns (a fixed
    seed), orthonormalized, then Rayleigh-Ritz; restarted from the Ritz vectors until every wanted
    pair's residual is below `TOLERANCE * lambda_max` (two rounds on the factors measured). A full
    `eigh` when the Krylov basis would be a third of `d` or more, or when 4 rounds do not converge.

    Args:
        factor: symmetric PSD `(d, d)`, any float dtype.
        count: `k <= d` pairs.

    Returns:
        eigenvalues `(k,)` descending and eigenvectors `(d, k)` as columns (float64), each with its
        largest-magnitude entry positive.
    """
    matrix = factor.double()
    dim = matrix.shape[0]
    block = count + 4
    if 3 * block * (_KRYLOV_STEPS + 1) > dim:
        return _full(matrix, count)
    generator = torch.Generator(device="cpu").manual_seed(0)
    start = torch.randn(dim, block, generator=generator, dtype=torch.float64).to(matrix.device)
    for _ in range(_ROUNDS):
        blocks = [torch.linalg.qr(start)[0]]
        for _ in range(_KRYLOV_STEPS):
            blocks.append(matrix @ blocks[-1])
        basis = torch.linalg.qr(torch.cat(blocks, dim=1))[0]
        product = matrix @ basis
        small = basis.T @ product
        values, vectors = torch.linalg.eigh(0.5 * (small + small.T))
        values, vectors = values.flip(0), vectors.flip(1)
        ritz = basis @ vectors[:, :count]
        residual = (product @ vectors[:, :count] - ritz * values[:count]).norm(dim=0)
        if float(residual.max()) <= TOLERANCE * max(float(values[0]), 1e-300):
            return values[:count], _signed(ritz)
        start = basis @ vectors[:, :block]
    return _full(matrix, count)


def _full(matrix: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(matrix)
    order = torch.argsort(values, descending=True)[:count]
    return values[order], _signed(vectors[:, order])


def _signed(vectors: torch.Tensor) -> torch.Tensor:
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
