"""`fisher_select` ranks a float32 eigendecomposition and refines its candidates in float64
(`stats.refine.refine_eigenvectors`); where that cannot be trusted it takes the float64 decomposition.

Stated tolerance: the refined eigenvectors agree with a float64 `eigh`'s to `1e-9` (each has residual
`<= 1e-12 lambda_max`), and `fisher_select`'s product with the float64 path's to `PRODUCT_RTOL`
(`test_float64_reference.py`, every Fisher variant on tiny models; here the fall-backs).
"""

from __future__ import annotations

import pytest
import torch

from fisherlora.init import fisher
from fisherlora.stats.container import LayerStats
from fisherlora.stats.refine import refine_eigenvectors
from fisherlora.stats.top_r import TOLERANCE
from init.test_float64_reference import assert_matches_reference


def symmetric(values: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(F, Q)`: `F = Q diag(values) Q^T` float64 for a random orthogonal `Q`."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(values.numel(), values.numel(), generator=generator,
                                        dtype=torch.float64))[0]
    return (basis * values) @ basis.T, basis


def aligned(vectors: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return vectors * torch.sign((vectors * reference).sum(dim=0))


def test_refined_columns_of_a_float32_decomposition_match_float64():
    values = torch.logspace(0, -4, 200, dtype=torch.float64)
    matrix, _ = symmetric(values, 0)
    approximate_values, approximate = torch.linalg.eigh(matrix.float())  # ~1e-7 relative, in its vectors ~1e-5
    chosen = torch.tensor([199, 180, 120, 3, 0])  # the largest, interior ones and near the smallest
    refined = refine_eigenvectors(matrix.__matmul__, approximate, approximate_values, chosen)
    assert refined is not None
    found_values, found = refined
    exact_values, exact = torch.linalg.eigh(matrix)
    assert float((matrix @ found - found * found_values).norm(dim=0).max()) <= TOLERANCE * float(values.max())
    torch.testing.assert_close(found_values, exact_values[chosen], rtol=1e-10, atol=0)
    torch.testing.assert_close(aligned(found, exact[:, chosen]), exact[:, chosen], rtol=0, atol=1e-9)
    start_error = float((aligned(approximate[:, chosen].double(), exact[:, chosen]) - exact[:, chosen]).abs().max())
    assert start_error > 1e-7, "the float32 vectors themselves are far from this tolerance"


@pytest.mark.parametrize(("gap", "converges"), [(1e-3, True), (1e-10, False)])
def test_a_pair_closer_than_float32_resolves_is_not_returned(gap: float, converges: bool):
    # Eigenvalues 0.5 + gap and 0.5 (the largest is 1). Float32 resolves a gap of 1e-3 (vectors to
    # ~1e-5) and the refinement then to float64; a gap of 1e-10 is far inside float32's error (~1e-7),
    # its vectors are an arbitrary mix of the pair, and the check refuses them.
    values = torch.linspace(1.0, 0.01, 60, dtype=torch.float64)
    values[30], values[31] = 0.5, 0.5 + gap
    matrix, exact = symmetric(values, 1)
    approximate_values, approximate = torch.linalg.eigh(matrix.float())
    order = torch.argsort(values)  # the exact pairs in eigh's ascending order
    pair = int(torch.nonzero(order == 31))
    refined = refine_eigenvectors(matrix.__matmul__, approximate, approximate_values, torch.tensor([pair]))
    if converges:
        assert refined is not None
        torch.testing.assert_close(aligned(refined[1], exact[:, 31:32]), exact[:, 31:32], rtol=0, atol=1e-9)
        return
    mixing = float((approximate[:, pair].double() @ exact[:, 30]).abs())
    assert mixing > 1e-2, "the float32 vector mixes the pair (the case tested)"
    assert refined is None


def select_stats(weight: torch.Tensor, seed: int) -> LayerStats:
    generator = torch.Generator().manual_seed(seed)
    d_out, d_in = weight.shape
    act_half = torch.randn(d_in, 3 * d_in, generator=generator)
    grad_half = torch.randn(d_out, 3 * d_out, generator=generator)
    return LayerStats(act_half @ act_half.T / (3 * d_in), grad_half @ grad_half.T / (3 * d_out), None, 10, 10,
                      "linear", (d_out, d_in))


def spy_on(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    calls: list[int] = []
    function = getattr(fisher, name)
    monkeypatch.setattr(fisher, name, lambda matrix, *args: calls.append(matrix.shape[1]) or function(matrix, *args))
    return calls


@pytest.mark.parametrize("shape", [(90, 60), (60, 90)])
def test_select_takes_the_refined_float32_ranking(shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch):
    generator = torch.Generator().manual_seed(sum(shape))
    weight = torch.randn(shape, generator=generator)
    float64_choices = spy_on(monkeypatch, "_float64_choice")
    assert_matches_reference("fisher_select", weight, select_stats(weight, 1))
    assert float64_choices == []


@pytest.mark.parametrize("shape", [(90, 60), (60, 90)])
def test_select_falls_back_on_a_pair_float32_cannot_split(shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch):
    # The two largest singular values 1e-10 apart (relative): both are chosen (identity statistics
    # rank by sigma), the float32 vectors mix them arbitrarily, refinement is refused, and the float64
    # decomposition (which needs only their span here) decides.
    generator = torch.Generator().manual_seed(sum(shape) + 1)
    d_out, d_in = shape
    narrow = min(shape)
    singular_values = torch.linspace(1.0, 0.05, narrow, dtype=torch.float64)
    singular_values[1] = 1.0 - 1e-10
    left = torch.linalg.qr(torch.randn(d_out, narrow, generator=generator, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(d_in, narrow, generator=generator, dtype=torch.float64))[0]
    weight = (left * singular_values) @ right.T
    stats = LayerStats(torch.eye(d_in), torch.eye(d_out), None, 1, 1, "linear", shape)
    float64_choices = spy_on(monkeypatch, "_float64_choice")
    assert_matches_reference("fisher_select", weight, stats)
    assert float64_choices == [narrow]


def test_select_falls_back_when_the_float32_ranking_is_wrong(monkeypatch: pytest.MonkeyPatch):
    # A float32 ranking that puts the 12 weakest triplets first (as a decomposition far worse than
    # float32's would): their exact scores fall far below the float32 scores left out, and the
    # float64 decomposition decides.
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(80, 50, generator=generator)
    scores = fisher._scores

    def inflated_in_float32(vectors: torch.Tensor, fisher_gram: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        found = scores(vectors, fisher_gram, side)
        if found.dtype == torch.float32:
            found[torch.argsort(found)[:12]] *= 1e6
        return found

    monkeypatch.setattr(fisher, "_scores", inflated_in_float32)
    float64_choices = spy_on(monkeypatch, "_float64_choice")
    assert_matches_reference("fisher_select", weight, select_stats(weight, 2))
    assert float64_choices == [50]
