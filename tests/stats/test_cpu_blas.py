"""BLAS routines through scipy: the triangular product equals torch's product with the lower triangle."""

from __future__ import annotations

import pytest
import torch
from scipy.linalg import blas
from threadpoolctl import threadpool_info

from fisherlora.stats.cpu_blas import transposed_lower_times


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-13), (torch.float32, 1e-6)])
@pytest.mark.parametrize(("dim", "count"), [(1, 1), (7, 3), (50, 80), (64, 16)])
def test_transposed_lower_times_is_the_product_with_the_lower_triangle(dim: int, count: int, dtype: torch.dtype,
                                                                       tolerance: float):
    generator = torch.Generator().manual_seed(dim * 100 + count)
    lower = torch.randn(dim, dim, generator=generator, dtype=dtype)
    matrix = torch.randn(dim, count, generator=generator, dtype=dtype)
    before = (lower.clone(), matrix.clone())
    result = transposed_lower_times(lower, matrix)
    expected = (torch.tril(lower.double()) @ matrix.double()).T
    assert result.shape == (count, dim) and result.dtype == dtype
    assert float((result.double() - expected).norm() / expected.norm()) <= tolerance
    assert torch.equal(lower, before[0]) and torch.equal(matrix, before[1])  # inputs untouched
    # non-contiguous inputs (a transposed weight) give the same result
    torch.testing.assert_close(transposed_lower_times(lower.T.contiguous().T, matrix.T.contiguous().T), result)


def test_blas_threads_follow_torch_during_the_product(monkeypatch: pytest.MonkeyPatch):
    seen: list[int] = []
    routine = blas.strmm

    def recording(*args, **kwargs):
        seen.extend(info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas")
        return routine(*args, **kwargs)

    monkeypatch.setattr(blas, "strmm", recording)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        transposed_lower_times(torch.eye(20), torch.ones(20, 3))
    finally:
        torch.set_num_threads(threads)
    assert seen and set(seen) == {1}


@pytest.mark.parametrize(("lower", "matrix", "message"), [
    (torch.eye(4), torch.ones(4, 2, dtype=torch.float64), "two float32 or two float64"),
    (torch.eye(4, dtype=torch.float16), torch.ones(4, 2, dtype=torch.float16), "two float32 or two float64"),
    (torch.eye(4), torch.ones(5, 2), r"L \(d, d\) and X \(d, n\), got \(4, 4\) and \(5, 2\)"),
    (torch.ones(4, 3), torch.ones(3, 2), r"got \(4, 3\)"),
])
def test_bad_inputs_are_refused(lower: torch.Tensor, matrix: torch.Tensor, message: str):
    with pytest.raises(ValueError, match=message):
        transposed_lower_times(lower, matrix)
