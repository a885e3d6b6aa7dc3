"""Published data-aware initializers that PEFT does not ship, re-implemented from their papers and
official code (family "paper"): LoRA-One, LoRA-DA, and LoRA-GA with the paper's own scale.

Notation (docs/method.md): `W (d_out, d_in)`; `M = (1/E) sum_t g_t x_t^T` the mean gradient of the
loss with respect to `W` per calibration example; `A`, `G` the input and output-gradient second
moments, damped as every initializer damps them (`A + lambda mean(diag A) I`); `s` the LoRA
scaling; `U S V^T` an SVD with singular values in descending order. Each function takes `W` in
float64 and returns `A_l (r, d_in)`, `B (d_out, r)`; `run_initializer` forms the residual only for
the function-preserving one (LoRA-GA).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..stats.top_r import bottom_eigenpairs, top_eigenpairs, top_singular_triplets
from .catalog import KRONECKER_AND_GRADIENT, Statistic
from .registry import LayerGeometry, register_initializer

GRADIENT_ONLY: tuple[Statistic, ...] = ("grad_mean",)


@dataclass
class LoraOneOptions:
    """Options of `lora_one`.

    Attributes:
        gamma: the step is `s / gamma` times the rank-r gradient normalized by its top singular value
            (LoRA-One's `stable_gamma`; the official configuration uses 128).
    """

    flag_prefix: ClassVar[str] = "one"
    gamma: float = field(default=128.0, metadata={"help": "lora_one gamma: step s/gamma along -M/sigma_1(M)"})

    def __post_init__(self) -> None:
        _check_positive(self, "gamma")


@dataclass
class LoraGAPaperOptions:
    """Options of `lora_ga_paper`.

    Attributes:
        gamma: both factors are multiplied by `d_out**0.25 / sqrt(gamma)` (LoRA-GA's `stable_gamma`,
            default 16).
    """

    flag_prefix: ClassVar[str] = "ga"
    gamma: float = field(default=16.0, metadata={"help": "lora_ga_paper gamma: factors times d_out^(1/4)/sqrt(gamma)"})

    def __post_init__(self) -> None:
        _check_positive(self, "gamma")


@dataclass
class LoraDAOptions:
    """Options of `lora_da`.

    Attributes:
        gamma: both factors are divided by `sqrt(gamma)` (the official configuration uses 1024).
        variance_beta: weight `beta` of the variance term (official configuration: 0.03; 0 keeps the
            bias term alone, i.e. the top right singular vectors of the natural-gradient step).
        population_size: `N`, the number of fine-tuning examples the variance term divides by (the
            official code passes the training set size); None: the number of calibration examples.
    """

    flag_prefix: ClassVar[str] = "da"
    gamma: float = field(default=1024.0, metadata={"help": "lora_da gamma: factors divided by sqrt(gamma)"})
    variance_beta: float = field(default=0.03, metadata={"help": "lora_da weight of the variance term"})
    population_size: int | None = field(default=None, metadata={
        "help": "lora_da N of the variance term (training set size; none: the calibration examples)"})

    def __post_init__(self) -> None:
        _check_positive(self, "gamma")
        if self.variance_beta < 0:
            raise ValueError(f"LoraDAOptions.variance_beta must be >= 0, got {self.variance_beta}")
        if self.population_size is not None and self.population_size < 1:
            raise ValueError(f"LoraDAOptions.population_size must be >= 1 or None, got {self.population_size}")


def _check_positive(options: object, name: str) -> None:
    value = getattr(options, name)
    if not value > 0:
        raise ValueError(f"{type(options).__name__}.{name} must be > 0, got {value}")


def _mean_gradient(geometry: LayerGeometry | None) -> torch.Tensor:
    """`M` in float64 on the weight's device (`run_initializer` has checked that it was collected)."""
    if geometry is None or geometry.grad_mean is None:
        raise ValueError("this initializer needs the mean gradient M (collect with collect_grad_mean=True)")
    return geometry.grad_mean.double()


@register_initializer(
    "lora_one",
    "LoRA-One: one rank-r step along -M: s B A = -(s/gamma) rank_r(M)/sigma_1(M), W untouched (no residual)",
    family="paper",
    statistics=GRADIENT_ONLY,
    preserves_function=False,
    options=LoraOneOptions,
)
def lora_one(weight: torch.Tensor, geometry: LayerGeometry | None, rank: int, scaling: float,
             options: object) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-One (Zhang, Liu & Chen, "One-step full gradient suffices for low-rank fine-tuning, provably
    and efficiently", arXiv 2502.01235, ICML 2025): its spectral initialization from the one-step full
    gradient (the repository README's "Algorithmic Overview").

    With `U S V^T = svd(-M)`:
    `B = U_r diag(sqrt(S_r)) / sqrt(S_1 gamma)`, `A = diag(sqrt(S_r)) V_r^T / sqrt(S_1 gamma)`, so
    `s B A = -(s / gamma) rank_r(M) / S_1`: one small rank-r gradient step, with no residual (the model's
    output moves at step 0). This follows the official code line for line (github.com/YuanheZ/LoRA-One,
    commit 01bba05, `run_exp.py::reinit_lora_modules`, mode "gradient", direction "LoRA-One", scale
    "stable": `B = U[:, :r] @ diag(sqrt(S[:r])) / sqrt(S[0])`, likewise `A`, both divided by
    `stable_gamma ** 0.5`, and no offset subtracted from the weight).

    Deviations: the exact top-`r` singular triplets (`stats.top_r`) instead of
    `torch.svd_lowrank(q=512, niter=16)`; `M` is the mean
    gradient per calibration example of the summed loss (the official code averages batch-mean loss
    gradients), which only rescales `M`, and `M / S_1` does not depend on that scale.

    Args:
        weight: `(d_out, d_in)` float64 (unused: the step does not depend on `W`).
        geometry: the layer's statistics with `grad_mean`.
        options: `LoraOneOptions`.

    Returns:
        `A (r, d_in)`, `B (d_out, r)` float64 with `||A||_F == ||B||_F`.

    Raises:
        ValueError: `M` is zero (the loss does not reach this layer): there is no step to take.
    """
    assert isinstance(options, LoraOneOptions)
    left, singular_values, right = top_singular_triplets(-_mean_gradient(geometry), rank)
    top = float(singular_values[0])
    if not top > 0:
        raise ValueError("the mean gradient M is zero, so LoRA-One has no step to take (does the loss depend "
                         "on this layer?)")
    half = torch.sqrt(singular_values / (top * options.gamma))
    return half[:, None] * right.T, left * half


@register_initializer(
    "lora_ga_paper",
    "LoRA-GA with the paper's scale: A = V_r^T, B = U_(r+1..2r) of svd(M), both times d_out^(1/4)/sqrt(gamma); "
    "residual subtracted",
    family="paper",
    statistics=GRADIENT_ONLY,
    options=LoraGAPaperOptions,
)
def lora_ga_paper(weight: torch.Tensor, geometry: LayerGeometry | None, rank: int, scaling: float,
                  options: object) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-GA (Wang, Yu & Li, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation", arXiv
    2407.05000, NeurIPS 2024), with the paper's own scale.

    With `U S V^T = svd(M)`: `A = V[:, :r]^T` and `B = U[:, r:2r]` (the paper's gradient approximation:
    `A` and `B` from disjoint singular vectors, so that the first update of `B A` approximates the full
    gradient), both multiplied by `d_out**0.25 / sqrt(gamma)` (its scale-stability rule, `gamma = 16`); the
    residual `W - s B A` is written into the base weight, so the output is unchanged at step 0. This is
    the official code (github.com/Outsider565/LoRA-GA, commit 89af7de,
    `peft/src/peft/tuners/lora/layer.py`: direction "ArB2r" at line 221, scale "stable" at lines
    240-245, `weight.data -= offset` at line 276).

    PEFT's port (`lora_ga`, peft/tuners/lora/layer.py `lora_ga_init`) differs in the scale: it keeps
    `A = V[:, :r]^T` unscaled and sets `B = U[:, r:2r] diag(S[r:2r]) d_out**0.25 / sqrt(gamma)`.

    Deviation: the exact top-`2r` singular triplets (`stats.top_r`) instead of
    `torch.svd_lowrank(q=4r, niter=4)`; a singular vector's sign is fixed by the matrix (its
    narrower side's largest-magnitude entry positive) where LAPACK's is arbitrary.

    Raises:
        ValueError: `2 r > min(d_out, d_in)`: the layer has fewer than `2 r` singular vectors.
    """
    assert isinstance(options, LoraGAPaperOptions)
    d_out, d_in = weight.shape
    if 2 * rank > min(d_out, d_in):
        raise ValueError(f"LoRA-GA takes A from the first r and B from the next r singular vectors of M, so it "
                         f"needs 2r = {2 * rank} <= min(d_out, d_in) = {min(d_out, d_in)}; use a rank <= "
                         f"{min(d_out, d_in) // 2} for this layer (PEFT rank_pattern) or another method")
    left, _, right = top_singular_triplets(_mean_gradient(geometry), 2 * rank)
    factor = d_out**0.25 / options.gamma**0.5
    return factor * right[:, :rank].T, factor * left[:, rank:]


@register_initializer(
    "lora_da",
    "LoRA-DA: s B A = (s/gamma) dW P P^T / |dW|_2, dW = -D^-1 M A^-1 (D = diag G), P = r smallest eigenvectors "
    "of beta tr(D^-1)/N A^-1 - dW^T dW; no residual",
    family="paper",
    statistics=KRONECKER_AND_GRADIENT,
    preserves_function=False,
    balanced_factors=False,
    options=LoraDAOptions,
)
def lora_da(weight: torch.Tensor, geometry: LayerGeometry | None, rank: int, scaling: float,
            options: object) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-DA (Zhang, Chu, Peng, Li, Luo, Jiang & Huang, "LoRA-DA: Data-Aware Initialization for
    Low-Rank Adaptation via Asymptotic Analysis", arXiv 2510.24561, ICML 2026).

    The paper minimizes the expected distance between the fine-tuned and the target weights, which
    splits into a bias term (the target step outside the adapter's input subspace, with the target
    step estimated by the K-FAC natural-gradient step) and a variance term (sampling noise, the
    inverse Fisher over `N` examples). Implemented exactly as its official code computes it
    (github.com/zqy0126/LoRA-DA, commit 928f484, `lora_da.py::_compute_group_initializations_for_betas`,
    defaults from `conf/lora_da.yaml`), written with `W (d_out, d_in)` (the code holds transposes):

    1. `D = diag(G)` (diagonal output-gradient factor, damped), `A` (input factor, damped).
    2. Natural-gradient step `dW = -D^-1 M A^-1`, normalized `dW_n = dW / sigma_1(dW)`.
    3. `Omega = -dW_n^T dW_n + beta * tr(D^-1) / (N sigma_1(dW)^2) * A^-1` `(d_in, d_in)`: the bias term
       (minus the captured step energy) plus the variance term, both divided by `sigma_1^2`.
    4. `P` = the `r` eigenvectors of `Omega` with the smallest eigenvalues, `(d_in, r)` orthonormal.
    5. `A_l = P^T / sqrt(gamma)`, `B = dW_n P / sqrt(gamma)`: `s B A_l = (s / gamma) dW_n P P^T`, the
       normalized natural-gradient step restricted to the chosen input subspace; no residual.

    The factors are not balanced (`A_l`'s rows are orthonormal times `1/sqrt(gamma)`, `B` is smaller),
    as in the official code's default (`balance_factors: false`).

    Deviations: the paper's equation numbers could not be read here (only its abstract and the code),
    so the steps above cite the code. Damping is this project's relative damping
    (`lambda mean(diag)` added to `A` and `G`, `FisherConfig.damping`) instead of an absolute 1e-6; the
    eigenvectors are computed exactly (`stats.top_r.bottom_eigenpairs`, checked, else a full `eigh`)
    instead of by 10 LOBPCG iterations; `N`
    defaults to the number of calibration examples, where the code passes the training set size
    (set `LoraDAOptions.population_size` to match it). `G` and `M` come from the summed loss (per-example
    gradients) where the code uses per-sequence mean losses; the direction and the ratio of the two
    terms are unchanged by that rescaling (both `dW` and `tr(D^-1)` scale with it), so the result is
    the same for sequences of equal length.

    Raises:
        ValueError: `M` is zero (no step to project).
    """
    assert isinstance(options, LoraDAOptions)
    if geometry is None:
        raise ValueError("lora_da needs Fisher statistics")
    gradient = _mean_gradient(geometry)
    act_damping, grad_damping = geometry.damping_added
    output_diagonal = geometry.stats.grad_cov.diagonal().double() + grad_damping  # diag of the damped G, (d_out,)
    act_inverse = geometry.act_inverse  # A^-1 (damped), (d_in, d_in)
    step = -(gradient / output_diagonal[:, None]) @ act_inverse
    step_gram = step.T @ step
    # sigma_1(step), from the smaller of its Gram matrices
    top = float(top_eigenpairs(step_gram if step.shape[0] >= step.shape[1] else step @ step.T, 1)[0][0]) ** 0.5
    if not top > 0:
        raise ValueError("the mean gradient M is zero, so LoRA-DA has no natural-gradient step to project")
    step = step / top
    omega = -step_gram / top**2
    coefficient = 0.0
    if options.variance_beta > 0:
        population = options.population_size or geometry.stats.num_examples
        coefficient = options.variance_beta * float(output_diagonal.reciprocal().sum()) / (population * top**2)
        omega = omega + coefficient * act_inverse
    # Omega <= coefficient A^-1 <= coefficient / delta_A (A + delta_A I >= delta_A I): its spectrum lies
    # below that bound, so its r smallest eigenpairs are the leading ones of a PSD shift of it.
    upper = coefficient / act_damping if act_damping > 0 else float(torch.linalg.matrix_norm(omega, ord=1))
    _, basis = bottom_eigenpairs(omega, rank, upper)
    root_gamma = options.gamma**0.5
    return basis.T / root_gamma, (step @ basis) / root_gamma
