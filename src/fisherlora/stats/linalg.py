"""Pure tensor math on Kronecker factors: damping, matrix roots, Fisher norms.

Nothing here knows about modules, hooks or PEFT; every function takes and returns tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .top_r import SymmetricOperator, dense_solve_preferred, top_eigenpairs


@dataclass(frozen=True)
class FactorRoots:
    """Symmetric square root of a damped factor and its inverse.

    Attributes:
        root: `F^{1/2}`, shape `(d, d)`.
        inverse_root: `F^{-1/2}`, shape `(d, d)`.
        damping_added: the absolute amount `lambda * mean(diag F)` added to the diagonal.
    """

    root: torch.Tensor
    inverse_root: torch.Tensor
    damping_added: float

    def root_times(self, matrix: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """`F^{1/2} X` for `X` `(d, n)`, computed in `dtype`."""
        return self.root.to(dtype) @ matrix.to(dtype)

    def inverse_root_times(self, matrix: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """`F^{-1/2} X` for `X` `(d, n)`, computed in `dtype`."""
        return self.inverse_root.to(dtype) @ matrix.to(dtype)


class SymmetricRoots(Protocol):
    """What `Whitening` reads of a factor's symmetric roots: dense `FactorRoots`, or roots kept in
    low-rank form (`sketch.LowRankRoots`), which apply in `O(d k n)` without a `(d, d)` matrix."""

    @property
    def damping_added(self) -> float: ...

    @property
    def inverse_root(self) -> torch.Tensor: ...

    def root_times(self, matrix: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor: ...

    def inverse_root_times(self, matrix: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor: ...


def damp(factor: torch.Tensor, damping: float, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, float]:
    """Add `damping * mean(diag factor)` to the diagonal.

    Args:
        factor: symmetric positive semi-definite matrix `(d, d)`.
        damping: relative damping `lambda >= 0`.
        dtype: the result's dtype (default: the factor's); the factor is copied once, in that dtype.

    Returns:
        The damped matrix `(d, d)` (a new tensor) and the absolute amount added. A factor whose
        diagonal is all zero is damped with `damping` itself, so the result is always invertible
        when `damping > 0`.
    """
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    damped = factor.to(dtype=dtype or factor.dtype, copy=True)
    mean_diagonal = float(damped.diagonal().mean())
    amount = damping * (mean_diagonal if mean_diagonal > 0 else 1.0)
    damped.diagonal().add_(amount)  # the same values as factor + amount * I, without forming I
    return damped, amount


def symmetric_roots(factor: torch.Tensor, damping: float) -> FactorRoots:
    """Damp a PSD factor, then take its symmetric square root and inverse square root.

    Args:
        factor: symmetric PSD matrix `(d, d)`.
        damping: relative damping, see `damp`.

    Returns:
        `FactorRoots` with both roots `(d, d)` in float64 (roots of ill-conditioned factors lose
        too much in float32).
    """
    damped, amount = damp(factor, damping, torch.float64)
    damped = 0.5 * (damped + damped.T)
    eigenvalues, eigenvectors = torch.linalg.eigh(damped)
    # eigh can return tiny negative values for a PSD matrix; a floor relative to the largest
    # keeps the inverse root finite without changing a well-conditioned factor.
    floor = max(float(eigenvalues.max()), 1e-300) * 1e-12
    eigenvalues = eigenvalues.clamp_min(floor)
    root = (eigenvectors * eigenvalues.sqrt()) @ eigenvectors.T
    inverse_root = (eigenvectors * eigenvalues.rsqrt()) @ eigenvectors.T
    return FactorRoots(root=root, inverse_root=inverse_root, damping_added=amount)


def top_eigenvectors(factor: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading eigenpairs of a symmetric matrix.

    Args:
        factor: symmetric matrix `(d, d)`.
        count: number of eigenpairs `k <= d`.

    Returns:
        eigenvalues `(k,)` in descending order and eigenvectors `(d, k)` as columns.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (factor + factor.T).double())
    order = torch.argsort(eigenvalues, descending=True)[:count]
    return eigenvalues[order], eigenvectors[:, order]


def fisher_norm_squared(delta: torch.Tensor, grad_root: torch.Tensor, act_root: torch.Tensor) -> float:
    """`||G^{1/2} dW A^{1/2}||_F^2`: twice the KL change caused by perturbing `W` by `dW` (K-FAC).

    Args:
        delta: weight perturbation `(d_out, d_in)`.
        grad_root: `G^{1/2}`, `(d_out, d_out)`.
        act_root: `A^{1/2}`, `(d_in, d_in)`.
    """
    whitened = grad_root @ delta.to(grad_root.dtype) @ act_root
    return float((whitened * whitened).sum())


def balanced_directions(
    left: torch.Tensor, core_diagonal: torch.Tensor, right: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rewrite `left @ diag(core) @ right.T` as `B0 @ diag(sig) @ A0` with orthonormal factors.

    QR on both sides, then the SVD of the small `r x r` core `R_left diag(core) R_right^T = P Sig Q^T`.

    Args:
        left: `(d_out, r)`. core_diagonal: `(r,)`. right: `(d_in, r)`.

    Returns:
        `B0 = Q_left P` `(d_out, r)` with orthonormal columns, `sig` `(r,)` descending, and
        `A0 = Q^T Q_right^T` `(r, d_in)` with orthonormal rows.
    """
    left_q, left_r = torch.linalg.qr(left)
    right_q, right_r = torch.linalg.qr(right)
    core = left_r @ torch.diag(core_diagonal.to(left_r.dtype)) @ right_r.T
    core_u, core_s, core_vh = torch.linalg.svd(core)
    return left_q @ core_u, core_s, core_vh @ right_q.T


def balanced_factors(
    left: torch.Tensor, core_diagonal: torch.Tensor, right: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the product `left @ diag(core) @ right.T` into two LoRA factors of equal norm.

    Whitened factors like `G^{-1/2} U_r` can be huge and ill-conditioned; this re-balances them
    without changing the product: orthonormalize both sides with QR, take the SVD of the small
    `r x r` core `R_left diag(core) R_right^T = P Sig Q^T`, and set
    `B = Q_left P sqrt(Sig / s)`, `A = sqrt(Sig / s) Q^T Q_right^T`, so `s B A` equals the product.

    Args:
        left: `(d_out, r)`.
        core_diagonal: `(r,)`, non-negative.
        right: `(d_in, r)`.
        scaling: LoRA scaling `s > 0`.

    Returns:
        `A` of shape `(r, d_in)` and `B` of shape `(d_out, r)`, with `||A||_F == ||B||_F`.
    """
    directions_b, singular_values, directions_a = balanced_directions(left, core_diagonal, right)
    half = torch.sqrt(singular_values.clamp_min(0) / scaling)
    return half[:, None] * directions_a, directions_b * half


@dataclass(frozen=True)
class Whitening:
    """A square root `R` of a damped factor, `F + delta I = R R^T`, and products with it.

    `R` is the lower Cholesky factor of a dense factor (`d^3 / 3` flops, against the `~9 d^3` of a full
    eigendecomposition), or the symmetric root `F^{1/2}` (`roots`). Any square root serves where the
    factor enters a Fisher norm: `||G^{1/2} X A^{1/2}||_F = ||R_G^T X R_A||_F`, because
    `R^T = Q F^{1/2}` for an orthogonal `Q`; so the best rank-`r` approximation in the Fisher norm,
    `R_G^{-T} [R_G^T W R_A]_r R_A^{-1}`, is the same for every choice of roots.

    Attributes:
        lower: the Cholesky factor `L` `(d, d)` float64, or None when `roots` are used.
        roots: symmetric roots, or None for a Cholesky factor.
        damping_added: the absolute `delta` added to the diagonal.
    """

    lower: torch.Tensor | None
    roots: SymmetricRoots | None
    damping_added: float

    def transpose_times(self, matrix: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """`R^T X` for `X` `(d, n)`, computed in `dtype`."""
        if self.lower is not None:
            # Converted, then transposed as a view: no strided copy of the (d, d) factor.
            return upper_triangular_times(self.lower.to(dtype).T, matrix.to(dtype))
        assert self.roots is not None
        return self.roots.root_times(matrix, dtype)

    def times(self, matrix: torch.Tensor) -> torch.Tensor:
        """`R X` for `X` `(d, n)`."""
        if self.lower is not None:
            return self.lower @ matrix.to(self.lower.dtype)
        assert self.roots is not None
        return self.roots.root_times(matrix)

    def solve(self, matrix: torch.Tensor) -> torch.Tensor:
        """`R^{-1} X` for `X` `(d, n)`."""
        if self.lower is not None:
            # As the right-hand solve `X^T R^-T`: with row-major tensors, MKL's is ~25% faster
            # (`d = 1536`, `n = 576`: 42 ms against 56 on one thread).
            return torch.linalg.solve_triangular(self.lower.T, matrix.to(self.lower.dtype).T, upper=True, left=False).T
        assert self.roots is not None
        return self.roots.inverse_root_times(matrix)

    def inverse(self) -> torch.Tensor:
        """`(R R^T)^{-1}`, the damped factor's inverse `(d, d)` (from the Cholesky factor: `~d^3` flops)."""
        if self.lower is not None:
            return torch.cholesky_inverse(self.lower)
        assert self.roots is not None
        return self.roots.inverse_root_times(self.roots.inverse_root)

    def solve_transpose(self, matrix: torch.Tensor) -> torch.Tensor:
        """`R^{-T} X` for `X` `(d, n)`."""
        if self.lower is not None:  # as `X^T R^-1` (see `solve`)
            return torch.linalg.solve_triangular(self.lower, matrix.to(self.lower.dtype).T, upper=False, left=False).T
        assert self.roots is not None
        return self.roots.inverse_root_times(matrix)

    def congruence(self, matrix: torch.Tensor) -> SymmetricOperator:
        """`R^T F R` for a symmetric `F` `(d, d)` float64, as an operator: `R^T (F (R X))` costs `~3 d^2`
        per column where forming it costs `~d^3`, and a top-`r` solve needs ~100 columns of `d = 576`."""
        return SymmetricOperator(matrix.shape[0], lambda block: self.transpose_times(matrix @ self.times(block)),
                                 lambda: _symmetric(self.transpose_times(self.transpose_times(matrix).T)),
                                 matrix.device)

    def inverse_congruence(self, matrix: torch.Tensor) -> SymmetricOperator:
        """`R^-1 F R^-T` for a symmetric `F` `(d, d)` float64, as an operator (see `congruence`)."""
        return SymmetricOperator(matrix.shape[0], lambda block: self.solve(matrix @ self.solve_transpose(block)),
                                 lambda: _symmetric(self.solve(self.solve(matrix).T)), matrix.device)


def _symmetric(matrix: torch.Tensor) -> torch.Tensor:
    return 0.5 * (matrix + matrix.T)


def inverse_whitened_triplets(matrix: torch.Tensor, output: Whitening, inputs: Whitening,
                              count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading `count` singular triplets of `X = R_out^-1 M R_in^-T`, un-whitened: `R_out^-T U_k`,
    `S_k`, `R_in^-T V_k` (float64), e.g. the rank-`k` natural gradient for `M` the mean gradient and
    the roots of the damped `G` and `A` (the product is the same for every choice of roots).

    The wider side's root is applied to `M` once; the top-`k` eigenpairs of the narrower side's
    Gram matrix (`X^T X = R_in^-1 (H^T H) R_in^-T` with `H = R_out^-1 M` for `d_out >= d_in`) come
    from `top_eigenpairs` with the narrower root inside its products (`Whitening.inverse_congruence`),
    and the other side's vectors from `H`: `R_out^-T U_k = R_out^-T H (R_in^-T V_k) / S_k`. When
    `S_k < 1e-4 S_1` (the Gram matrix squares the condition number), from a full SVD of `X`.

    Args:
        matrix: `M` `(d_out, d_in)`. output, inputs: roots of the `(d_out, d_out)` and `(d_in, d_in)` factors.
    """
    matrix = matrix.double()
    tall = matrix.shape[0] >= matrix.shape[1]
    half = output.solve(matrix) if tall else inputs.solve(matrix.T).T  # R_out^-1 M, or M R_in^-T
    narrow = inputs if tall else output
    whitened_gram = narrow.inverse_congruence(_symmetric(half.T @ half if tall else half @ half.T))
    # A whitened gradient's top is nearly flat (MiniLM: eigengap at the 8th of 0.02-4.6% of the largest):
    # the Krylov method needed 120-480 columns at 384 wide, and forming the matrix for the dense solve
    # costs less (all 37 layers of MiniLM: 0.69 s against 2.05 s, the same pairs to 1e-12).
    formed = dense_solve_preferred(whitened_gram.dim, whitened_gram.device)
    values, vectors = top_eigenpairs(whitened_gram.dense() if formed else whitened_gram, count)
    singular_values = values.clamp_min(0).sqrt()
    if float(singular_values[-1]) <= 1e-4 * float(singular_values[0]):  # also a zero matrix
        whitened = inputs.solve(half.T).T if tall else output.solve(half)
        left, full_values, right_transposed = torch.linalg.svd(whitened, full_matrices=False)
        return (output.solve_transpose(left[:, :count]), full_values[:count],
                inputs.solve_transpose(right_transposed[:count].T))
    near = narrow.solve_transpose(vectors)  # the narrower side's un-whitened vectors
    far = (half @ near if tall else half.T @ near) / singular_values  # X V_k / S_k = U_k (or X^T U_k / S_k)
    if tall:
        return output.solve_transpose(far), singular_values, near
    return near, singular_values, inputs.solve_transpose(far)


def upper_triangular_times(upper: torch.Tensor, matrix: torch.Tensor, block: int = 256) -> torch.Tensor:
    """`U X` for an upper-triangular `U` `(d, d)` and `X` `(d, n)`, skipping the zero blocks below the
    diagonal (about half the work of a dense product for `d >> block`)."""
    dim = upper.shape[0]
    if dim <= block:
        return upper @ matrix
    result = torch.empty(dim, matrix.shape[1], dtype=torch.result_type(upper, matrix), device=matrix.device)
    for start in range(0, dim, block):
        end = min(start + block, dim)
        torch.matmul(upper[start:end, start:], matrix[start:], out=result[start:end])
    return result


def cholesky_whitening(factor: torch.Tensor, damping: float, damped: torch.Tensor | None = None) -> Whitening:
    """`Whitening` of a dense PSD factor: the Cholesky factor of `F + damping * mean(diag F) I` in float64.

    A damped factor is positive definite; one that is not numerically (no damping and a singular
    factor) falls back to the symmetric roots with their eigenvalue floor (`symmetric_roots`).

    Args:
        factor: `F` `(d, d)`. damping: relative damping (see `damp`).
        damped: `damp(F.double(), damping)[0]` when the caller has it already.
    """
    amount = damping * _mean_diagonal(factor)
    if damped is None:
        damped = damp(factor, damping, torch.float64)[0]
    lower, info = torch.linalg.cholesky_ex(damped)  # reads the lower triangle (the sums are symmetric)
    if int(info) == 0:
        return Whitening(lower=lower, roots=None, damping_added=amount)
    return Whitening(lower=None, roots=symmetric_roots(factor, damping), damping_added=amount)


def whitened_norm_squared(delta: torch.Tensor, output: Whitening, inputs: Whitening) -> float:
    """`||R_G^T dW R_A||_F^2 = ||G^{1/2} dW A^{1/2}||_F^2` from square roots already at hand: two
    triangular products in float32 (half the flops of `fisher_norm_squared_damped`'s two products;
    the terms are squares, so nothing cancels: relative error ~4e-9 measured on SmolLM2's gate
    projection), summed in float64.

    Args:
        delta: `(d_out, d_in)`. output, inputs: roots of the damped `G` `(d_out, d_out)` and `A`.
    """
    left = output.transpose_times(delta, torch.float32)  # R_G^T dW
    both = inputs.transpose_times(left.T, torch.float32)  # R_A^T dW^T R_G, the transpose
    return float(both.double().square().sum())


def fisher_norm_squared_damped(delta: torch.Tensor, grad_cov: torch.Tensor, act_cov: torch.Tensor,
                               damping: float, dtype: torch.dtype = torch.float64) -> float:
    """`||G^{1/2} dW A^{1/2}||_F^2 = <G dW, dW A>` with damped `G`, `A`, from the factors themselves
    (no root): two products, computed in `dtype`, summed in float64.

    Args:
        delta: `(d_out, d_in)`. grad_cov: `G` `(d_out, d_out)`. act_cov: `A` `(d_in, d_in)`.
        damping: relative damping (see `damp`).
    """
    grad_amount = damping * _mean_diagonal(grad_cov)
    act_amount = damping * _mean_diagonal(act_cov)
    delta = delta.to(dtype)
    left = grad_cov.to(dtype) @ delta + grad_amount * delta
    right = delta @ act_cov.to(dtype) + act_amount * delta
    return float((left.double() * right.double()).sum())


def low_rank_fisher_norm_squared(lora_b: torch.Tensor, lora_a: torch.Tensor, damped_grad_cov: torch.Tensor,
                                 damped_act_cov: torch.Tensor) -> float:
    """`||G^{1/2} B A_l A^{1/2}||_F^2 = tr((B^T G B)(A_l A A_l^T))` in `O(d^2 r)`, float64.

    Args:
        lora_b: `(d_out, r)`. lora_a: `(r, d_in)`. damped_grad_cov, damped_act_cov: the damped `G`, `A`.
    """
    lora_b, lora_a = lora_b.double(), lora_a.double()
    output_gram = lora_b.T @ (damped_grad_cov.double() @ lora_b)
    input_gram = (lora_a @ damped_act_cov.double()) @ lora_a.T
    return float((output_gram * input_gram).sum())


def _mean_diagonal(factor: torch.Tensor) -> float:
    mean = float(factor.diagonal().double().mean())
    return mean if mean > 0 else 1.0
