"""`stats.subset_eigen`: LAPACK's subset eigensolver against `torch.linalg.eigh`, its BLAS threads, its errors."""

from __future__ import annotations

import pytest
import scipy.linalg
import torch
from threadpoolctl import threadpool_info

from fisherlora.stats import cpu_blas
from fisherlora.stats.subset_eigen import subset_eigenpairs


def _symmetric(dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    half = torch.randn(dim, dim, generator=generator, dtype=torch.float64) * torch.logspace(0, -2, dim,
                                                                                           dtype=torch.float64)
    return half @ half.T - 0.1 * torch.eye(dim, dtype=torch.float64)  # not PSD: any symmetric matrix


def _aligned(vectors: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return vectors * torch.sign((vectors * reference).sum(dim=0))


@pytest.mark.parametrize(("first", "last"), [(0, 3), (194, 199), (100, 100), (0, 199)])
def test_the_pairs_asked_for_are_those_of_a_full_decomposition(first: int, last: int):
    matrix = _symmetric(200, first + last)
    values, vectors = subset_eigenpairs(matrix, first, last)
    full_values, full_vectors = torch.linalg.eigh(matrix)
    assert values.dtype == vectors.dtype == torch.float64
    assert vectors.shape == (200, last - first + 1)
    torch.testing.assert_close(values, full_values[first:last + 1], rtol=1e-12, atol=1e-12)
    reference = full_vectors[:, first:last + 1]
    torch.testing.assert_close(_aligned(vectors, reference), reference, rtol=0, atol=1e-9)


def test_a_float32_matrix_is_solved_in_float64():
    matrix = _symmetric(50, 1)
    values, _ = subset_eigenpairs(matrix.float(), 45, 49)
    assert values.dtype == torch.float64
    torch.testing.assert_close(values, torch.linalg.eigh(matrix.float().double())[0][45:], rtol=1e-12, atol=1e-12)


def test_blas_threads_follow_torch_during_the_solve(monkeypatch: pytest.MonkeyPatch):
    seen: list[int] = []
    solve = scipy.linalg.eigh

    def recording(*args, **kwargs):
        seen.extend(info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas")
        return solve(*args, **kwargs)

    monkeypatch.setattr(scipy.linalg, "eigh", recording)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        subset_eigenpairs(_symmetric(40, 2), 0, 1)
    finally:
        torch.set_num_threads(threads)
    assert seen and set(seen) == {1}
    assert cpu_blas._controller is not None


@pytest.mark.parametrize(("first", "last", "message"), [(-1, 2, "first=-1"), (3, 2, "first=3, last=2"),
                                                         (0, 10, "last=10")])
def test_a_range_outside_the_matrix_is_refused(first: int, last: int, message: str):
    with pytest.raises(ValueError, match=message):
        subset_eigenpairs(_symmetric(10, 3), first, last)


def test_a_non_square_or_non_finite_matrix_is_refused():
    with pytest.raises(ValueError, match=r"square matrix, got shape \(4, 5\)"):
        subset_eigenpairs(torch.zeros(4, 5), 0, 1)
    matrix = _symmetric(6, 4)
    matrix[2, 3] = matrix[3, 2] = float("nan")
    with pytest.raises(ValueError, match="infs or NaNs"):
        subset_eigenpairs(matrix, 0, 1)
