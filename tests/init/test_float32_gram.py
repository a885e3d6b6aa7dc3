"""The weight's Gram matrix in the wider factor's metric in float32 (`weight_gram.weight_gram`, taken for a
layer with `d_wide^2 d_narrow >= FLOAT32_GRAM_FLOPS`: SmolLM2's query/output and MLP layers).

Stated tolerance against the float64 product: `fisher_svd`'s and `fisher_zero`'s (direction source
"weight") adapter (`s B A`, or
`A` for the zero start) to `FLOAT32_PRODUCT_RTOL` relative (Frobenius), the captured energy to
`ENERGY_RTOL`; `fisher_select` takes the same triplets (its scores only rank them), so its product
matches to the float64 tolerance. Why `1e-4` is enough: the float32 statistics themselves move the
float64 product by 2e-7 to 7e-6 when they change by one unit in the last place (SmolLM2-135M), and
the first optimizer step of training moves the adapter by far more. Here the threshold is lowered
to 0 so that the tiny models' layers take the float32 path; the float64 path is the reference.
"""

from __future__ import annotations

import pytest
import torch

import fisherlora as fl
from fisherlora.init.fisher_zero_step import FisherZeroOptions
from fisherlora.init.geometry import FactorCache
from fisherlora.init.registry import compute_factors
from fisherlora.stats import weight_gram as gram_module
from fisherlora.stats.container import LayerStats
from init.test_float64_reference import PRODUCT_RTOL

FLOAT32_PRODUCT_RTOL = 1e-4
ENERGY_RTOL = 1e-5
RANK = 4
SCALING = 2.0
METHODS = ["fisher_svd", "fisher_zero", "fisher_select"]


def factors_with_gram_threshold(method: str, threshold: float, weight: torch.Tensor, stats: LayerStats,
                                monkeypatch: pytest.MonkeyPatch, cache: FactorCache | None = None,
                                damping: float = 1e-3) -> tuple[torch.Tensor, float | None, list[torch.dtype]]:
    """`(s B A or A, captured energy, dtypes of the weight Grams formed)` with `FLOAT32_GRAM_FLOPS = threshold`."""
    monkeypatch.setattr(gram_module, "FLOAT32_GRAM_FLOPS", threshold)
    dtypes: list[torch.dtype] = []
    gram = gram_module.weight_gram
    monkeypatch.setattr("fisherlora.init.geometry.weight_gram", lambda matrix, factor, amount, dtype:
                        dtypes.append(dtype) or gram(matrix, factor, amount, dtype))
    options = FisherZeroOptions(source="weight") if method == "fisher_zero" else None
    config = fl.FisherConfig(method=method, damping=damping, options=options)
    factors = compute_factors(method, weight, stats, min(RANK, *weight.shape), SCALING, config, cache=cache)
    adapter = factors.lora_a.double() if method == "fisher_zero" else factors.product()
    return adapter, factors.captured_energy, dtypes


def assert_float32_gram_matches(method: str, weight: torch.Tensor, stats: LayerStats,
                                monkeypatch: pytest.MonkeyPatch, damping: float = 1e-3) -> None:
    ours, energy, dtypes = factors_with_gram_threshold(method, 0, weight, stats, monkeypatch, damping=damping)
    expected, expected_energy, reference_dtypes = factors_with_gram_threshold(method, float("inf"), weight, stats,
                                                                              monkeypatch, damping=damping)
    assert dtypes == [torch.float32] and reference_dtypes == [torch.float64]
    error = float((ours - expected).norm() / expected.norm())
    tolerance = PRODUCT_RTOL if method == "fisher_select" else FLOAT32_PRODUCT_RTOL
    assert error <= tolerance, f"{method}: relative error {error:.2e}"
    if expected_energy:
        assert energy == pytest.approx(expected_energy, rel=ENERGY_RTOL)


@pytest.mark.parametrize("method", METHODS)
def test_llama_layers_with_float32_grams_match_the_float64_path(method: str, llama_stats,
                                                               monkeypatch: pytest.MonkeyPatch):
    model, stats = llama_stats
    for name in stats:
        assert_float32_gram_matches(method, model.get_submodule(name).weight.detach(), stats[name], monkeypatch)


@pytest.mark.parametrize(("method", "shape"), [(method, shape) for method in METHODS
                                               for shape in [(420, 300), (300, 420)]])
def test_random_statistics_with_float32_grams_match(method: str, shape: tuple[int, int],
                                                    monkeypatch: pytest.MonkeyPatch):
    # Wide enough for the block Krylov solver; an ill-conditioned A (singular values over 2.3 decades),
    # a rank-5 G: the damping alone lifts its null space.
    generator = torch.Generator().manual_seed(sum(shape))
    d_out, d_in = shape
    grad_half = torch.randn(d_out, 5, generator=generator, dtype=torch.float64)
    act_half = torch.randn(d_in, 200, generator=generator, dtype=torch.float64) * torch.logspace(0, -2.3, 200,
                                                                                               dtype=torch.float64)
    stats = LayerStats((act_half @ act_half.T / 200).float(), (grad_half @ grad_half.T).float(), None, 10, 10,
                       "linear", shape)
    weight = torch.randn(d_out, d_in, generator=generator) / d_in**0.5
    for damping in (1e-3, 1e-1):
        assert_float32_gram_matches(method, weight, stats, monkeypatch, damping=damping)


@pytest.mark.parametrize("shape", [(70, 40), (40, 70), (90, 40), (300, 20)])
def test_weight_gram_in_float32_is_the_float64_one_to_float32_rounding(shape: tuple[int, int]):
    """(90, 40) and (300, 20) take the triangular product (`d >= 2 n`), the others the full one."""
    generator = torch.Generator().manual_seed(shape[0])
    matrix = torch.randn(*shape, generator=generator)
    half = torch.randn(shape[0], shape[0], generator=generator)
    factor = half @ half.T
    expected = matrix.double().T @ (factor.double() + 0.3 * torch.eye(shape[0], dtype=torch.float64)) @ matrix.double()
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        gram = gram_module.weight_gram(matrix, factor, 0.3, dtype)
        assert gram.dtype == torch.float64 and torch.equal(gram, gram.T)
        assert float((gram - expected).norm() / expected.norm()) <= tolerance, dtype


def test_gram_dtype_is_float32_only_where_the_product_is_costly():
    assert gram_module.gram_dtype(1536, 576) == torch.float32  # SmolLM2's MLP: 1.4e9 multiply-adds
    assert gram_module.gram_dtype(576, 576) == torch.float32  # its query and output projections
    assert gram_module.gram_dtype(576, 192) == torch.float64  # its key and value projections (W A W^T)
    assert gram_module.gram_dtype(384, 384) == torch.float64  # MiniLM's attention layers


@pytest.mark.parametrize(("shape", "triangular"), [((1536, 576), True), ((1536, 384), True), ((576, 576), False),
                                                    ((576, 192), True), ((192, 576), False)])
def test_the_triangular_product_is_taken_where_it_was_measured_faster(shape: tuple[int, int], triangular: bool):
    assert gram_module.triangular_preferred(torch.empty(shape[0], shape[0]), torch.empty(*shape)) is triangular


def test_the_triangular_product_matches_the_full_one_and_reads_the_lower_triangle_only(
        monkeypatch: pytest.MonkeyPatch):
    generator = torch.Generator().manual_seed(5)
    matrix = torch.randn(120, 30, generator=generator)
    half = torch.randn(120, 120, generator=generator)
    factor = half @ half.T
    calls: list[int] = []
    original = gram_module.transposed_lower_times
    monkeypatch.setattr(gram_module, "transposed_lower_times",
                        lambda lower, x: calls.append(1) or original(lower, x))
    for dtype, tolerance in ((torch.float64, 1e-13), (torch.float32, 1e-6)):
        triangular = gram_module.weight_gram(matrix, factor, 0.7, dtype)
        garbage_above = factor + torch.triu(torch.full_like(factor, 1e6), diagonal=1)
        assert torch.equal(gram_module.weight_gram(matrix, garbage_above, 0.7, dtype), triangular)
        monkeypatch.setattr(gram_module, "TRIANGULAR_MIN_RATIO", 10**9)
        full = gram_module.weight_gram(matrix, factor, 0.7, dtype)
        monkeypatch.setattr(gram_module, "TRIANGULAR_MIN_RATIO", 2)
        assert float((triangular - full).norm() / full.norm()) <= tolerance, dtype
    assert len(calls) == 4  # the full product never called it
