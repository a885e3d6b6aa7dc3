"""fisher_zero and fisher_step as pure functions: their formulas against independent computations,
PEFT's default row norm measured on PEFT's own layers, and the option-dependent statistics."""

from __future__ import annotations

import pytest
import torch

import fisherlora as fl
from fisherlora.init import run_initializer
from fisherlora.init.catalog import get_method
from fisherlora.init.fisher_zero_step import PEFT_DEFAULT_A_ROW_NORM, FisherStepOptions, FisherZeroOptions
from fisherlora.init.geometry import LayerGeometry

from .test_initializers import identity_stats, make_stats

DAMPING = 1e-2


def damped_power(factor: torch.Tensor, power: float) -> torch.Tensor:
    """`(F + lambda mean(diag F) I)^power` by an eigendecomposition written out here."""
    factor = factor.double()
    damped = factor + DAMPING * factor.diagonal().mean() * torch.eye(factor.shape[0], dtype=torch.float64)
    values, vectors = torch.linalg.eigh(damped)
    return (vectors * values**power) @ vectors.T


def row_space_projector(matrix: torch.Tensor) -> torch.Tensor:
    """Orthogonal projector onto the row space of a full-row-rank `(r, d)` matrix, `(d, d)`."""
    matrix = matrix.double()
    return matrix.T @ torch.linalg.solve(matrix @ matrix.T, matrix)


def rank_r_input_side(whitened: torch.Tensor, act_inverse_root: torch.Tensor, rank: int) -> torch.Tensor:
    """`(A^-1/2 V_r)^T`: the input side of the rank-r part of `G^-1/2 (whitened) A^-1/2`."""
    _, _, right_transposed = torch.linalg.svd(whitened)
    return (act_inverse_root @ right_transposed[:rank].T).T


def zero(source: str) -> fl.FisherConfig:
    return fl.FisherConfig(method="fisher_zero", damping=DAMPING, options=FisherZeroOptions(source=source),
                          captured_energy=True)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("source", ["weight", "natural_gradient", "gradient"])
def test_fisher_zero_spans_the_fisher_chosen_input_directions(seed: int, source: str):
    stats = make_stats(10, 8, seed=seed, grad_rank=4)
    weight = torch.randn(10, 8, generator=torch.Generator().manual_seed(seed + 10))
    result = run_initializer("fisher_zero", weight, stats, 3, 2.0, zero(source))
    grad_root, act_root = damped_power(stats.grad_cov, 0.5), damped_power(stats.act_cov, 0.5)
    grad_inverse_root, act_inverse_root = damped_power(stats.grad_cov, -0.5), damped_power(stats.act_cov, -0.5)
    assert stats.grad_mean is not None
    if source == "weight":
        expected = rank_r_input_side(grad_root @ weight.double() @ act_root, act_inverse_root, 3)
    elif source == "natural_gradient":
        expected = rank_r_input_side(grad_inverse_root @ stats.grad_mean.double() @ act_inverse_root,
                                     act_inverse_root, 3)
    else:
        expected = torch.linalg.svd(stats.grad_mean.double())[2][:3]
    torch.testing.assert_close(row_space_projector(result.lora_a), row_space_projector(expected), atol=1e-5, rtol=0)
    # Orthonormal rows, each with PEFT's default row norm; B = 0 and W untouched.
    gram = result.lora_a.double() @ result.lora_a.double().T
    torch.testing.assert_close(gram, PEFT_DEFAULT_A_ROW_NORM**2 * torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.equal(result.lora_b, torch.zeros(10, 3)) and torch.equal(result.residual, weight)


@pytest.mark.parametrize("source", ["natural_gradient", "gradient"])
def test_a_zero_start_holds_no_energy_and_skips_the_fisher_norm_of_w(source: str, monkeypatch: pytest.MonkeyPatch):
    # B = 0: the captured energy is 0 whatever ||W||_F in the Fisher norm is, and that norm (a product
    # of the wider factor with W, which these sources never form) is not computed.
    def refuse(self, weight):
        raise AssertionError("the Fisher norm of W was computed for a zero product")
    monkeypatch.setattr(LayerGeometry, "fisher_norm_squared", refuse)
    stats = make_stats(10, 8, seed=0, grad_rank=4)
    result = run_initializer("fisher_zero", torch.randn(10, 8), stats, 3, 2.0, zero(source))
    assert result.captured_energy == 0.0


def test_fisher_zero_weight_source_with_identity_statistics_takes_pissas_input_directions():
    weight = torch.randn(7, 6, generator=torch.Generator().manual_seed(0))
    config = fl.FisherConfig(method="fisher_zero", damping=0.0, options=FisherZeroOptions(source="weight"))
    result = run_initializer("fisher_zero", weight, identity_stats(7, 6), 2, 1.0, config)
    _, _, right_transposed = torch.linalg.svd(weight.double())
    torch.testing.assert_close(row_space_projector(result.lora_a), row_space_projector(right_transposed[:2]),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_peft_default_a_rows_have_the_declared_norm(layer: str):
    """The constant is what PEFT's own `reset_lora_parameters` produces: the mean squared row norm of a
    freshly created LoRA A (64 rows of 500+ entries; standard error ~0.002) is 1/3."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    module = torch.nn.Linear(512, 80) if layer == "linear" else torch.nn.Conv2d(60, 80, kernel_size=3)
    model = get_peft_model(torch.nn.Sequential(module), LoraConfig(r=64, lora_alpha=64, target_modules=["0"]))
    lora_a = model.base_model.model[0].lora_A["default"].weight.detach().reshape(64, -1)
    assert float(lora_a.square().sum(dim=1).mean()) == pytest.approx(PEFT_DEFAULT_A_ROW_NORM**2, abs=0.01)


def test_fisher_zero_reads_m_only_for_its_gradient_sources():
    entry = get_method("fisher_zero")
    assert entry.statistics_needed(zero("weight")) == ("act_cov", "grad_cov")
    assert entry.statistics_needed(zero("natural_gradient")) == ("act_cov", "grad_cov", "grad_mean")
    assert entry.statistics_needed(zero("gradient")) == ("grad_mean",)
    for source in ("weight", "natural_gradient", "gradient"):  # the declared union covers every option
        assert set(entry.statistics_needed(zero(source))) <= set(entry.statistics)
    weight = torch.randn(6, 5)
    stats = make_stats(6, 5)
    stats.grad_mean = None
    run_initializer("fisher_zero", weight, stats, 2, 1.0, zero("weight"))  # needs no M
    with pytest.raises(ValueError, match="needs grad_mean for module 'q'"):
        run_initializer("fisher_zero", weight, stats, 2, 1.0, zero("gradient"), module_name="q")


def test_fisher_zero_source_is_checked():
    with pytest.raises(ValueError, match="FisherZeroOptions.source must be one of"):
        FisherZeroOptions(source="weights")  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("gamma", [1.0, 128.0])
def test_fisher_step_is_the_normalized_rank_r_natural_gradient_step(seed: int, gamma: float):
    stats = make_stats(9, 7, seed=seed, grad_rank=3)
    scaling = 2.0
    config = fl.FisherConfig(method="fisher_step", damping=DAMPING, options=FisherStepOptions(gamma=gamma))
    weight = torch.randn(9, 7, generator=torch.Generator().manual_seed(seed))
    result = run_initializer("fisher_step", weight, stats, 3, scaling, config)
    grad_inverse_root, act_inverse_root = damped_power(stats.grad_cov, -0.5), damped_power(stats.act_cov, -0.5)
    assert stats.grad_mean is not None
    left, values, right_transposed = torch.linalg.svd(grad_inverse_root @ stats.grad_mean.double() @ act_inverse_root)
    natural = grad_inverse_root @ left[:, :3] @ torch.diag(values[:3]) @ right_transposed[:3] @ act_inverse_root
    expected = -(scaling / gamma) * natural / torch.linalg.matrix_norm(natural, ord=2)
    step = scaling * result.lora_b.double() @ result.lora_a.double()
    torch.testing.assert_close(step, expected, atol=1e-6 * float(expected.abs().max()), rtol=1e-4)
    assert float(torch.linalg.matrix_norm(step, ord=2)) == pytest.approx(scaling / gamma, rel=1e-5)
    assert float(result.lora_a.norm()) == pytest.approx(float(result.lora_b.norm()), rel=1e-5)
    assert torch.equal(result.residual, weight)
    # The step goes downhill to first order: <M, step> < 0.
    assert float((stats.grad_mean.double() * step).sum()) < 0


def test_fisher_step_refuses_a_zero_gradient_naming_the_module():
    stats = make_stats(6, 5)
    stats.grad_mean = torch.zeros(6, 5)
    with pytest.raises(ValueError, match="module 'encoder.q'.*natural gradient is zero"):
        run_initializer("fisher_step", torch.randn(6, 5), stats, 2, 1.0, fl.FisherConfig(method="fisher_step"),
                        module_name="encoder.q")


def test_fisher_step_gamma_must_be_positive():
    with pytest.raises(ValueError, match="FisherStepOptions.gamma must be > 0"):
        FisherStepOptions(gamma=0.0)


@pytest.mark.parametrize("method", ["fisher_zero", "fisher_step"])
def test_factor_signs_are_fixed(method: str):
    """An SVD's factors are defined up to a sign per component, which differs between computation paths
    (dense or sketched statistics, devices); each method fixes it: the largest-magnitude entry of every
    row of A is positive."""
    for seed in range(4):
        result = run_initializer(method, torch.randn(8, 6), make_stats(8, 6, seed=seed), 3, 1.0,
                                 fl.FisherConfig(method=method))
        largest = result.lora_a.gather(1, result.lora_a.abs().argmax(dim=1, keepdim=True))
        assert (largest > 0).all()
