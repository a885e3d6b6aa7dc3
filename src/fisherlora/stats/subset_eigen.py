"""A range of eigenpairs of a dense symmetric matrix, by LAPACK's subset solver on a CPU.

`torch.linalg.eigh` computes every eigenpair (`~9 d^3` flops in float64). LAPACK's `dsyevr` computes
only those asked for: the reduction to tridiagonal form (`~4/3 d^3`) and little more for a few pairs.
torch does not expose it; `scipy.linalg.eigh(subset_by_index=...)` does. Measured on one thread, the
top 8 pairs of random `(d, d)` matrices, median of 3 alternating (with two benchmark processes on the
machine's two cores, so absolute times are inflated): `d = 384 / 576 / 768 / 1536` took 11 / 17 / 60 /
359 ms against 36 / 82 / 204 / 1629 ms for `torch.linalg.eigh`.
"""

from __future__ import annotations

import torch

from .cpu_blas import blas_threads_as_torch


def subset_eigenpairs(matrix: torch.Tensor, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs `first` to `last` (inclusive, counted from the smallest eigenvalue) of a symmetric matrix.

    On a CPU by LAPACK's `dsyevr` on those pairs only (through scipy, with as many BLAS threads as torch
    uses); elsewhere by `torch.linalg.eigh` on the device, sliced.

    Args:
        matrix: symmetric `(d, d)`, any float dtype (computed in float64; its lower triangle is read).
        first, last: `0 <= first <= last < d`.

    Returns:
        eigenvalues `(last - first + 1,)` ascending and eigenvectors `(d, last - first + 1)` as columns,
        float64, on `matrix`'s device; the vectors' signs are LAPACK's (arbitrary).

    Raises:
        ValueError: `first`/`last` out of range, or a matrix with a NaN or infinite entry.
    """
    dim = matrix.shape[0]
    if matrix.ndim != 2 or matrix.shape[1] != dim:
        raise ValueError(f"subset_eigenpairs needs a square matrix, got shape {tuple(matrix.shape)}")
    if not 0 <= first <= last < dim:
        raise ValueError(f"subset_eigenpairs: need 0 <= first <= last < {dim}, got first={first}, last={last}")
    matrix = matrix.detach().double()
    if matrix.device.type != "cpu":
        values, vectors = torch.linalg.eigh(matrix)
        return values[first:last + 1], vectors[:, first:last + 1]
    import scipy.linalg

    with blas_threads_as_torch():
        values, vectors = scipy.linalg.eigh(matrix.contiguous().numpy(), subset_by_index=[first, last],
                                            driver="evr")
    return torch.from_numpy(values), torch.from_numpy(vectors)
