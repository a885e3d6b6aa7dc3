"""Chosen eigenpairs of a symmetric matrix to float64 accuracy from a cheaper (float32) full decomposition.

A float32 `eigh` of a `(n, n)` matrix takes about half the time of the float64 one (SmolLM2's 576-wide
weight Gram matrices: 27 against 53 ms of CPU) and gives every eigenvector to `~eps32 lambda_max / gap`.
Where all of them are needed only to choose a few (e.g. `fisher_select` ranks every singular triplet
of `W`), the chosen ones are then refined in float64 with the float32 basis as coordinates, which
costs a few products of the matrix with the chosen columns, and checked by their residuals like
`top_r`'s answers: a pair that does not pass is not returned.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .top_r import TOLERANCE

STEPS = 4
"""Corrections at most; on SmolLM2-135M and MiniLM-L6 (`fisher_select`'s 12 to 18 candidates of every
linear layer's weight Gram matrix) two sufficed on 246 of 247 layers, three on the last: the float32
basis makes each correction ~`eps32 lambda_max / gap` times smaller."""


def refine_eigenvectors(apply: Callable[[torch.Tensor], torch.Tensor], basis: torch.Tensor, values: torch.Tensor,
                        chosen: torch.Tensor, steps: int = STEPS) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The eigenpairs of a symmetric `F` `(n, n)` near the `chosen` columns of an approximate full
    eigendecomposition `F ~ X diag(lambda) X^T`, refined in float64.

    Each step is one Newton step on `F v = theta v` in the coordinates of `X`, the column-wise form
    of Ogita & Aishima's refinement (Japan J. Indust. Appl. Math. 35:1007-1035, 2018, "Iterative
    refinement for symmetric eigenvalue decomposition") with `X` kept fixed: for a chosen column `x`
    with Rayleigh quotient `theta`, `s = X^T F x`, `d = e_j - X^T x` (`j` its index in `X`),
    `x <- x + X c` with `c_i = (s_i + theta d_i) / (theta - lambda_i)` for `i != j` and `c_j = d_j / 2`.
    Directions whose eigenvalue is within the basis' own error of `theta` (twice its off-diagonal terms
    at the first step, their rule for clustered eigenvalues) are not corrected: such a near-degenerate
    pair stays mixed and fails the check.

    Args:
        apply: `X (n, k) -> F X` in float64.
        basis: `X` `(n, n)`, approximate eigenvectors as columns (e.g. from a float32 `eigh`), any float dtype.
        values: `lambda` `(n,)`, their approximate eigenvalues.
        chosen: `(k,)` indices of the columns to refine.
        steps: corrections at most.

    Returns:
        eigenvalues `(k,)` and unit eigenvectors `(n, k)` in float64, in the order of `chosen`, each with
        residual `||F v - theta v|| <= top_r.TOLERANCE * max |lambda|` (so within that over the eigengap
        of the exact eigenvector, Davis-Kahan); None when a pair does not pass within `steps`.
    """
    basis, values = basis.double(), values.double()
    columns = torch.arange(chosen.numel(), device=basis.device)
    scale = max(float(values.abs().max()), 1e-300)
    vectors = basis[:, chosen]
    uncertain = None
    for step in range(steps + 1):
        product = apply(vectors)
        norms = vectors.norm(dim=0)
        theta = (vectors * product).sum(dim=0) / norms.square()
        residual = (product - vectors * theta).norm(dim=0) / norms
        if float(residual.max()) <= TOLERANCE * scale:  # False for NaN
            return theta, vectors / norms
        if step == steps:
            break
        coordinates = basis.T @ product  # s = X^T F x
        defect = -(basis.T @ vectors)  # d = e_j - X^T x
        defect[chosen, columns] += 1.0
        numerator = coordinates + theta * defect
        if uncertain is None:  # the basis' own error, from the first step, when x is still its column
            off = numerator.clone()
            off[chosen, columns] = 0.0
            uncertain = 2 * (off.abs().amax(dim=0) + scale * defect.abs().amax(dim=0))
        gap = theta - values[:, None]
        correction = torch.where(gap.abs() > uncertain, numerator / gap, torch.zeros_like(gap))
        correction[chosen, columns] = defect[chosen, columns] / 2
        vectors = vectors + basis @ correction
    return None
