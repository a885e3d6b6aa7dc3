"""Initializers as pure functions: shapes, exact residuals, balance, and the PiSSA/Fisher-norm limits."""

from __future__ import annotations

import pytest
import torch

import fisherlora as fl
from fisherlora.init import INITIALIZERS, run_initializer
from fisherlora.stats.container import LayerStats
from fisherlora.stats.linalg import fisher_norm_squared, symmetric_roots


def random_psd(dimension: int, generator: torch.Generator, rank: int | None = None) -> torch.Tensor:
    factor = torch.randn(dimension, rank or dimension, generator=generator, dtype=torch.float64)
    return (factor @ factor.T / factor.shape[1]).float()


def make_stats(d_out: int, d_in: int, seed: int = 0, grad_rank: int | None = None) -> LayerStats:
    generator = torch.Generator().manual_seed(seed)
    return LayerStats(
        act_cov=random_psd(d_in, generator),
        grad_cov=random_psd(d_out, generator, grad_rank),
        grad_mean=torch.randn(d_out, d_in, generator=generator),
        num_tokens=100,
        num_examples=10,
        layer_type="linear",
        weight_shape=(d_out, d_in),
    )


def identity_stats(d_out: int, d_in: int) -> LayerStats:
    return LayerStats(torch.eye(d_in), torch.eye(d_out), torch.zeros(d_out, d_in), 1, 1, "linear", (d_out, d_in))


@pytest.fixture
def weight() -> torch.Tensor:
    return torch.randn(12, 9, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("method", sorted(INITIALIZERS))
@pytest.mark.parametrize("scaling", [0.5, 2.0])
def test_every_initializer_has_its_declared_properties(method: str, scaling: float, weight: torch.Tensor):
    """Each catalogue entry is tested as what it declares: zero-start (B = 0, W untouched),
    function-preserving (residual + s B A == W, non-zero adapter) or a real first step (W untouched,
    non-zero adapter); its non-zero factors balanced unless it declares otherwise."""
    entry = INITIALIZERS[method]
    stats = make_stats(12, 9, grad_rank=3)  # rank-deficient G, as for a classification head
    result = run_initializer(method, weight, stats, 4, scaling, fl.FisherConfig(method=method))
    assert result.lora_a.shape == (4, 9) and result.lora_b.shape == (12, 4)
    assert result.lora_a.dtype == torch.float32 and result.residual.dtype == torch.float32
    assert torch.isfinite(result.lora_a).all() and torch.isfinite(result.lora_b).all()
    if entry.zero_start:
        assert torch.equal(result.lora_b, torch.zeros_like(result.lora_b)), f"{method} declares B = 0"
        assert torch.equal(result.residual, weight), f"{method} declares W untouched"
        assert (result.lora_a.norm(dim=1) > 0).all(), f"{method}: every row of A must be non-zero"
        return
    if entry.preserves_function:
        torch.testing.assert_close(result.residual + scaling * result.lora_b @ result.lora_a, weight,
                                   atol=1e-5, rtol=0)
    else:
        assert torch.equal(result.residual, weight), f"{method} takes a real step: W must stay untouched"
    assert (result.lora_b @ result.lora_a).abs().max() > 0, "the adapter must not be zero"
    if entry.balanced_factors:
        norm_a, norm_b = float(result.lora_a.norm()), float(result.lora_b.norm())
        assert norm_a == pytest.approx(norm_b, rel=1e-4), f"{method}: unbalanced factors |A|={norm_a} |B|={norm_b}"


def pissa_factors(weight: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA written out independently from PEFT's `pissa_init`."""
    left, values, right = torch.linalg.svd(weight.double(), full_matrices=False)
    half = torch.sqrt(values[:rank] / scaling)
    return (half[:, None] * right[:rank]).float(), (left[:, :rank] * half).float()


def test_fisher_svd_with_identity_statistics_is_pissa(weight: torch.Tensor):
    result = run_initializer("fisher_svd", weight, identity_stats(12, 9), 3, 2.0, fl.FisherConfig())
    pissa_a, pissa_b = pissa_factors(weight, 3, 2.0)
    torch.testing.assert_close(result.lora_b @ result.lora_a, pissa_b @ pissa_a, atol=1e-5, rtol=1e-5)
    # Factors agree up to the sign of each component (an SVD is defined up to signs).
    signs = torch.sign((result.lora_b * pissa_b).sum(0))
    torch.testing.assert_close(result.lora_b * signs, pissa_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.lora_a * signs[:, None], pissa_a, atol=1e-5, rtol=1e-5)


def test_fisher_svd_with_identity_statistics_matches_peft_pissa(weight: torch.Tensor):
    from peft import LoraConfig, get_peft_model

    model = torch.nn.Sequential(torch.nn.Linear(9, 12, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(weight)
    peft_model = get_peft_model(model, LoraConfig(r=3, lora_alpha=6, target_modules=["0"], init_lora_weights="pissa"))
    layer = peft_model.base_model.model[0]
    ours = run_initializer("fisher_svd", weight, identity_stats(12, 9), 3, 2.0, fl.FisherConfig())
    torch.testing.assert_close(ours.residual, layer.base_layer.weight.detach(), atol=1e-5, rtol=1e-5)
    peft_product = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(ours.lora_b @ ours.lora_a, peft_product, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_fisher_svd_residual_has_the_smallest_fisher_norm(seed: int, weight: torch.Tensor):
    stats = make_stats(12, 9, seed=seed)
    config = fl.FisherConfig(damping=1e-3)
    ours = run_initializer("fisher_svd", weight, stats, 3, 1.0, config)
    pissa_a, pissa_b = pissa_factors(weight, 3, 1.0)
    grad_root = symmetric_roots(stats.grad_cov, config.damping).root
    act_root = symmetric_roots(stats.act_cov, config.damping).root
    ours_norm = fisher_norm_squared(ours.residual.double(), grad_root, act_root)
    pissa_norm = fisher_norm_squared((weight - pissa_b @ pissa_a).double(), grad_root, act_root)
    assert ours_norm <= pissa_norm * (1 + 1e-6)
    # With non-trivial statistics the optimum is strictly better than the weight-only choice.
    assert ours_norm < pissa_norm * 0.999


def test_fisher_select_follows_the_statistics():
    # W = diag(5, 4, 3, 2, 1): PiSSA keeps components 0 and 1; the Fisher says components 3 and 4
    # carry all the output sensitivity, so fisher_select must keep those.
    weight = torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]))
    grad_cov = torch.diag(torch.tensor([1e-4, 1e-4, 1e-4, 1.0, 1.0]))
    stats = LayerStats(torch.eye(5), grad_cov, None, 1, 1, "linear", (5, 5))
    result = run_initializer("fisher_select", weight, stats, 2, 1.0, fl.FisherConfig(damping=0.0))
    product = result.lora_b @ result.lora_a
    torch.testing.assert_close(product, torch.diag(torch.tensor([0.0, 0.0, 0.0, 2.0, 1.0])), atol=1e-5, rtol=0)
    identity = run_initializer("fisher_select", weight, identity_stats(5, 5), 2, 1.0, fl.FisherConfig(damping=0.0))
    torch.testing.assert_close(identity.lora_b @ identity.lora_a, torch.diag(torch.tensor([5.0, 4.0, 0, 0, 0])),
                               atol=1e-5, rtol=0)


def test_milora_takes_the_smallest_singular_triplets():
    weight = torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]))
    result = run_initializer("milora", weight, None, 2, 1.0, fl.FisherConfig(method="milora"))
    torch.testing.assert_close(result.lora_b @ result.lora_a, torch.diag(torch.tensor([0.0, 0, 0, 2, 1])), atol=1e-6,
                               rtol=0)


def test_fisher_eig_spans_the_top_eigenvectors():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=generator)
    act_cov = torch.diag(torch.tensor([0.1, 9.0, 0.2, 0.3, 0.4]))
    grad_cov = torch.diag(torch.tensor([0.1, 0.2, 0.3, 7.0, 0.5, 0.6]))
    stats = LayerStats(act_cov, grad_cov, None, 1, 1, "linear", (6, 5))
    result = run_initializer("fisher_eig", weight, stats, 1, 1.0, fl.FisherConfig(method="fisher_eig"))
    product = result.lora_b @ result.lora_a
    expected = torch.zeros(6, 5)
    expected[3, 1] = weight[3, 1]  # projection of W onto output direction e3 and input direction e1
    torch.testing.assert_close(product, expected, atol=1e-5, rtol=0)


def test_fisher_grad_spectrum_rule_approximates_the_natural_gradient():
    stats = make_stats(8, 7, seed=1)
    # A rank-2 M is reproduced exactly by a rank-2 adapter: s B A == G^-1 M A^-1 (damped).
    generator = torch.Generator().manual_seed(2)
    stats.grad_mean = (torch.randn(8, 2, generator=generator) @ torch.randn(2, 7, generator=generator)).float()
    config = fl.FisherConfig(method="fisher_grad", options=fl.FisherGradOptions(scale="spectrum"), damping=1e-2)
    result = run_initializer("fisher_grad", torch.randn(8, 7, generator=generator), stats, 2, 0.5, config)
    grad_inverse = torch.linalg.inv(stats.grad_cov.double() + 1e-2 * stats.grad_cov.diagonal().mean() * torch.eye(8))
    act_inverse = torch.linalg.inv(stats.act_cov.double() + 1e-2 * stats.act_cov.diagonal().mean() * torch.eye(7))
    natural = grad_inverse @ stats.grad_mean.double() @ act_inverse
    torch.testing.assert_close((0.5 * result.lora_b.double() @ result.lora_a.double()), natural, rtol=1e-4, atol=1e-5)


def test_fisher_grad_stable_rule_has_lora_ga_norms():
    stats = make_stats(8, 7, seed=1)
    config = fl.FisherConfig(method="fisher_grad", options=fl.FisherGradOptions(scale="stable", gamma=16.0))
    result = run_initializer("fisher_grad", torch.randn(8, 7), stats, 3, 1.0, config)
    expected_column_norm = 8**0.25 / 16**0.5
    torch.testing.assert_close(result.lora_b.norm(dim=0), torch.full((3,), expected_column_norm), rtol=1e-5, atol=0)
    torch.testing.assert_close(result.lora_a.norm(dim=1), torch.full((3,), expected_column_norm), rtol=1e-5, atol=0)


@pytest.mark.parametrize("rank", [0, 10])
def test_bad_rank_is_refused_with_the_module_name(rank: int, weight: torch.Tensor):
    with pytest.raises(ValueError, match=rf"module 'encoder.q'.*rank r={rank}"):
        run_initializer("fisher_svd", weight, make_stats(12, 9), rank, 1.0, fl.FisherConfig(), module_name="encoder.q")


def test_quantized_weight_is_refused(weight: torch.Tensor):
    with pytest.raises(TypeError, match=r"module 'q'.*torch.int8.*not floating point"):
        run_initializer("milora", weight.to(torch.int8), None, 2, 1.0, fl.FisherConfig(), module_name="q")


def test_statistics_of_the_wrong_shape_are_refused(weight: torch.Tensor):
    with pytest.raises(ValueError, match=r"statistics for module 'q' have weight shape \(9, 12\)"):
        run_initializer("fisher_svd", weight, make_stats(9, 12), 2, 1.0, fl.FisherConfig(), module_name="q")


def test_fisher_grad_without_grad_mean_is_refused(weight: torch.Tensor):
    stats = make_stats(12, 9)
    stats.grad_mean = None
    with pytest.raises(ValueError, match="needs grad_mean for module 'q'"):
        run_initializer("fisher_grad", weight, stats, 2, 1.0, fl.FisherConfig(), module_name="q")


def test_unknown_method_lists_the_choices(weight: torch.Tensor):
    with pytest.raises(ValueError, match="unknown initializer 'fisher_nope'.*fisher_svd"):
        run_initializer("fisher_nope", weight, None, 2, 1.0, fl.FisherConfig())


def test_config_rejects_bad_choices():
    with pytest.raises(ValueError, match="FisherConfig.fisher must be one of"):
        fl.FisherConfig(fisher="emprical")
    with pytest.raises(ValueError, match="FisherConfig.damping"):
        fl.FisherConfig(damping=-1)


def test_methods_list_names_every_initializer_and_baseline():
    methods = fl.list_methods()
    for name in [*INITIALIZERS, "lora", "pissa", "olora", "eva", "corda", "lora_ga", "gaussian"]:
        assert name in methods and methods[name]
    assert tuple(methods) == fl.METHODS
