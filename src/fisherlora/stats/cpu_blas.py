"""BLAS routines torch does not expose, called through scipy on CPU tensors.

torch has no triangular matrix product (`?trmm`) and no subset eigensolver; scipy exposes both
(`scipy.linalg.blas`, `scipy.linalg.eigh(subset_by_index=...)`), with its own OpenBLAS. Every call
runs with as many BLAS threads as torch uses (`blas_threads_as_torch`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_controller = None


@contextlib.contextmanager
def blas_threads_as_torch() -> Iterator[None]:
    """scipy's BLAS (its own OpenBLAS, one thread per core by default) limited to torch's thread count,
    so that `--threads 1` means one thread here too (two benchmark workers share two cores)."""
    global _controller
    if _controller is None:
        import scipy.linalg  # noqa: F401  (loads the BLAS the controller is to find)
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()  # built once: finding the libraries costs ~2 ms a call
    with _controller.limit(limits=torch.get_num_threads(), user_api="blas"):
        yield


def transposed_lower_times(lower: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """`(L X)^T = X^T L^T` `(n, d)` for the lower triangle `L` of `lower` `(d, d)` and `X` `(d, n)`, both
    float32 or both float64 CPU tensors, by BLAS `?trmm`: `d^2 n / 2` multiply-adds instead of a full
    product's `d^2 n`. The strict upper triangle of `lower` is never read.

    Raises:
        ValueError: a tensor off the CPU, mixed or non-float32/64 dtypes, or shapes that do not chain.
    """
    if lower.device.type != "cpu" or matrix.device.type != "cpu":
        raise ValueError(f"transposed_lower_times runs on CPU tensors, got {lower.device} and {matrix.device}")
    if lower.dtype != matrix.dtype or lower.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"transposed_lower_times needs two float32 or two float64 tensors, "
                         f"got {lower.dtype} and {matrix.dtype}")
    if lower.ndim != 2 or matrix.ndim != 2 or lower.shape[0] != lower.shape[1] or lower.shape[1] != matrix.shape[0]:
        raise ValueError(f"transposed_lower_times needs L (d, d) and X (d, n), got {tuple(lower.shape)} "
                         f"and {tuple(matrix.shape)}")
    from scipy.linalg import blas

    routine = blas.strmm if lower.dtype == torch.float32 else blas.dtrmm
    # Row-major L and X are column-major L^T and X^T: B := B op(A) with B = X^T, A = L^T (upper), no
    # transpose, gives X^T L^T without copying either input (the result is a new array: X is a weight).
    with blas_threads_as_torch():
        result = routine(1.0, lower.detach().contiguous().T.numpy(), matrix.detach().contiguous().T.numpy(),
                         side=1, lower=0)
    return torch.from_numpy(result)
