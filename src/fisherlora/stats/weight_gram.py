"""The weight's Gram matrix in the metric of its wider side's factor, `M^T (F + delta I) M`.

`fisher_svd`, `fisher_select`, `fisher_zero` (direction source "weight") and the rank allocation read
the Fisher-norm singular values of `W` through this `(n, n)` matrix (see
`init.geometry.LayerGeometry.weight_spectrum`); forming it is the costliest step of their
factorization on a layer with a wide factor (`d^2 n` multiply-adds for `F` `(d, d)`).
"""

from __future__ import annotations

import torch

from .cpu_blas import transposed_lower_times

FLOAT32_GRAM_FLOPS = 2**27
"""A weight Gram matrix `M^T F M` with `d^2 n` at least this is formed in float32 (`gram_dtype`): SmolLM2's
query/output and MLP layers, MiniLM's MLP layers; below it the float64 product is cheap."""

TRIANGULAR_MIN_RATIO = 2
"""On a CPU, `weight_gram` multiplies by `F`'s lower triangle (BLAS `?trmm`, half the `d^2 n`) when
`d >= TRIANGULAR_MIN_RATIO * n`. Measured in float32 on one thread, median of 7 alternating, next to
two benchmark processes: `(d, n) = (1536, 576)` took 56 against 80 ms for the full product (0.70x);
at `(576, 576)` 8.9 against 9.1 ms, no gain (the `d n^2` product that remains is as large there)."""


def gram_dtype(dim: int, count: int) -> torch.dtype:
    """The dtype `weight_gram` is computed in for `M` `(dim, count)`: float32 when the `dim^2 count`
    product is the costly part of a layer's factorization (`FLOAT32_GRAM_FLOPS`), else float64."""
    return torch.float32 if dim * dim * count >= FLOAT32_GRAM_FLOPS else torch.float64


def triangular_preferred(factor: torch.Tensor, matrix: torch.Tensor) -> bool:
    """Whether `weight_gram` takes the triangular product (`TRIANGULAR_MIN_RATIO`, CPU tensors only)."""
    dim, count = matrix.shape
    return factor.device.type == "cpu" and matrix.device.type == "cpu" and dim >= TRIANGULAR_MIN_RATIO * count


def weight_gram(matrix: torch.Tensor, factor: torch.Tensor, amount: float, dtype: torch.dtype) -> torch.Tensor:
    """`M^T (F + delta I) M` `(n, n)` float64, symmetric, for `M` `(d, n)` and a symmetric factor `F`
    `(d, d)`: the weight's Gram matrix in the metric of its wider side's damped factor (`W^T G W` for a
    tall `W`, `W A W^T` for a wide one; its congruence with the narrower side's root has the squared
    Fisher-norm singular values of `W`, see `LayerGeometry.weight_spectrum`).

    In float32 (`gram_dtype`) the `d^2 n` product, the costliest of a layer's factorization, takes half
    the float64 time. Its inputs are exact there (the statistics are summed in float32, a float32
    model's weight is float32); the result carries float32 rounding, `~1e-7 ||M||^2 ||F||` in norm,
    and the leading eigenvectors of the congruence move by about that over their eigengap. Measured
    against float64 on the layers of SmolLM2-135M and MiniLM-L6 (all linear layers) this applies to:
    `fisher_svd`'s rank-8 product `s B A` within 1.1e-5 relative, `fisher_zero`'s (source "weight") `A` within 1.5e-5
    (SmolLM2's down projections; 4e-6 on MiniLM), where the float64 path itself moves by 2e-7 to 7e-6
    when the float32 statistics change by one unit in the last place; the tests hold it to `1e-4`.

    For `d >= 2 n` on a CPU (`triangular_preferred`) `F + delta I = L + L^T` with `L` its lower
    triangle, diagonal halved: `M^T (F + delta I) M = Y + Y^T` with `Y = M^T L^T M`, and `L M` is a
    triangular product (`d^2 n / 2`) on `F` itself (its whole diagonal), less the row scaling
    `diag(F / 2 - delta / 2) M`: no `(d, d)` copy is made. Only `F`'s lower triangle is read there. Its
    float32 rounding is larger (`Y` is not symmetric and can exceed the sum): on SmolLM2-135M, within
    2.3e-5 of the float64 `s B A` for `fisher_svd` and 3.2e-5 of `fisher_zero`'s `A`, against 1.1e-5 and
    1.5e-5 above.

    Args:
        matrix: `M` `(d, n)`. factor: `F` `(d, d)`. amount: `delta` added to `F`'s diagonal (0 when `F`
            is damped already). dtype: float32 or float64, what the products are computed in.
    """
    matrix = matrix.to(dtype)
    if triangular_preferred(factor, matrix):
        factor = factor.to(dtype)
        # trmm reads F's lower triangle with its whole diagonal in place (no (d, d) copy of it); the
        # diagonal's other half, less delta / 2, comes off as a row scaling: L M = tril(F) M - diag(c) M.
        correction = 0.5 * factor.diagonal() - 0.5 * amount  # c (d,)
        lower_product = transposed_lower_times(factor, matrix)  # (tril(F) M)^T (n, d)
        lower_product.sub_(matrix.T * correction)
        half = lower_product @ matrix  # (L M)^T M = M^T L^T M
        return (half + half.T).double()
    product = factor.to(dtype) @ matrix
    if amount:
        product.add_(matrix, alpha=amount)  # (F + delta I) M without a damped copy of F
    gram = (matrix.T @ product).double()
    return 0.5 * (gram + gram.T)
