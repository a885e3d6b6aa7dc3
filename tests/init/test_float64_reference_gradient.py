"""The initializers built on the mean gradient `M` (LoRA-One, LoRA-GA with the paper's scale, LoRA-DA,
`fisher_zero` with `zero_source="gradient"`) against the full float64 decompositions they replaced.

They now take the top-`r` singular triplets of `M` from its smaller Gram matrix (`stats.top_r`),
LoRA-DA's inverse of `A` from a Cholesky factor and its `r` smallest eigenvectors of `Omega` by the
checked block Krylov method. The reference below is the previous code, written out: full SVDs,
`A^-1` from the symmetric inverse root (a full `eigh`), a full `eigh` of `Omega`. Stated tolerance:
`s B A` (for `fisher_zero`, whose `B` is zero: `A`) agrees to `PRODUCT_RTOL` relative (Frobenius),
as in `test_float64_reference.py`. A singular vector's sign is arbitrary in a full SVD; LoRA-GA's
product pairs vectors of different triplets, so the reference fixes the signs as `stats.top_r`
does (the narrower side's largest-magnitude entry positive).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import fisherlora as fl
from fisherlora.init.fisher_zero_step import PEFT_DEFAULT_A_ROW_NORM, FisherZeroOptions
from fisherlora.init.paper import LoraDAOptions, LoraGAPaperOptions, LoraOneOptions
from fisherlora.init.registry import compute_factors
from fisherlora.stats.container import LayerStats
from fisherlora.stats.linalg import symmetric_roots
from init.test_float64_reference import PRODUCT_RTOL, signed

RANK = 4
SCALING = 2.0
VARIANTS = {
    "lora_one": LoraOneOptions(gamma=64.0),
    "lora_ga_paper": LoraGAPaperOptions(gamma=16.0),
    "lora_da": LoraDAOptions(gamma=256.0),
    "lora_da/bias_only": LoraDAOptions(gamma=256.0, variance_beta=0.0),
    "lora_da/large_variance": LoraDAOptions(gamma=256.0, variance_beta=3.0, population_size=7),
    "fisher_zero/gradient": FisherZeroOptions(source="gradient"),
}


def narrow_side_signed_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full SVD `U, S, V` (columns) with each triplet's sign fixed on the narrower side."""
    left, values, right_transposed = torch.linalg.svd(matrix, full_matrices=False)
    right = right_transposed.T
    narrow = right if matrix.shape[0] >= matrix.shape[1] else left
    signs = signed(narrow)[0] / narrow[0]  # +-1 per column (the first row is never exactly zero here)
    return left * signs, values, right * signs


def reference(variant: str, stats: LayerStats, damping: float, rank: int) -> torch.Tensor:
    """The previous path's `s B A` (`A` for `fisher_zero`)."""
    options = VARIANTS[variant]
    gradient = stats.grad_mean.double()
    if variant == "lora_one":
        left, values, right_transposed = torch.linalg.svd(-gradient, full_matrices=False)
        best = left[:, :rank] * values[:rank] @ right_transposed[:rank]
        return SCALING * best / (values[0] * options.gamma)
    if variant == "lora_ga_paper":
        left, _, right = narrow_side_signed_svd(gradient)
        factor = gradient.shape[0] ** 0.5 / options.gamma
        return SCALING * factor * left[:, rank:2 * rank] @ right[:, :rank].T
    if variant == "fisher_zero/gradient":
        _, _, right_transposed = torch.linalg.svd(gradient, full_matrices=False)
        rows = right_transposed[:rank]
        return PEFT_DEFAULT_A_ROW_NORM * signed(rows.T).T
    # LoRA-DA, as init/paper.py computed it before.
    grad_cov = stats.grad_cov.double()
    output_diagonal = grad_cov.diagonal() + damping * grad_cov.diagonal().mean()
    inverse_root = symmetric_roots(stats.act_cov, damping).inverse_root
    act_inverse = inverse_root @ inverse_root
    step = -(gradient / output_diagonal[:, None]) @ act_inverse
    top = float(torch.linalg.matrix_norm(step, ord=2))
    step = step / top
    omega = -(step.T @ step)
    if options.variance_beta > 0:
        population = options.population_size or stats.num_examples
        omega = omega + options.variance_beta * float(output_diagonal.reciprocal().sum()) / (population * top**2) \
            * act_inverse
    basis = torch.linalg.eigh((omega + omega.T) / 2)[1][:, :rank]
    return SCALING * step @ basis @ basis.T / options.gamma


def assert_matches_reference(variant: str, weight: torch.Tensor, stats: LayerStats, damping: float = 1e-3) -> None:
    method = variant.split("/")[0]
    rank = min(RANK, min(weight.shape) // 2)
    config = fl.FisherConfig(method=method, damping=damping, options=VARIANTS[variant])
    factors = compute_factors(method, weight, stats, rank, SCALING, config)
    ours = factors.lora_a.double() if method == "fisher_zero" else factors.product()
    expected = reference(variant, stats, damping, rank)
    error = float((ours - expected).norm() / expected.norm())
    assert error <= PRODUCT_RTOL, f"{variant}: relative error {error:.2e}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_llama_layers_match_the_full_decompositions(variant: str, llama_stats):
    model, stats = llama_stats
    for name in stats:
        assert_matches_reference(variant, model.get_submodule(name).weight.detach(), stats[name])


@pytest.mark.parametrize(("variant", "shape"), itertools.product(VARIANTS, [(72, 56), (300, 420), (420, 300)]))
def test_random_statistics_match_the_full_decompositions(variant: str, shape: tuple[int, int]):
    # 300 and 420 wide: the Gram matrices and Omega are wide enough for the block Krylov method.
    generator = torch.Generator().manual_seed(sum(shape))
    d_out, d_in = shape
    act_half = torch.randn(d_in, 200, generator=generator, dtype=torch.float64) * torch.linspace(2, 0.01, 200,
                                                                                               dtype=torch.float64)
    grad_half = torch.randn(d_out, 30, generator=generator, dtype=torch.float64)
    # M of a few examples: a decaying spectrum, as the mean gradient has.
    gradient = (torch.randn(d_out, 40, generator=generator) * torch.logspace(0, -2, 40)) @ torch.randn(
        40, d_in, generator=generator)
    stats = LayerStats((act_half @ act_half.T / 200).float(), (grad_half @ grad_half.T / 30).float(), gradient,
                       10, 10, "linear", shape)
    weight = torch.randn(d_out, d_in, generator=generator)
    assert_matches_reference(variant, weight, stats)
    assert_matches_reference(variant, weight, stats, damping=1e-1)
