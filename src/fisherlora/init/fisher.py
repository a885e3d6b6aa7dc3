"""The Fisher-guided initializers (the formulas are in docs/method.md).

Each takes `W (d_out, d_in)` in float64 and a `LayerGeometry` (statistics with damped roots) and
returns `A (r, d_in)`, `B (d_out, r)`; `run_initializer` forms the residual `W - s B A`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from ..config import check_literals
from ..stats.linalg import balanced_directions, balanced_factors, inverse_whitened_triplets
from ..stats.refine import refine_eigenvectors
from .catalog import KRONECKER_AND_GRADIENT
from .registry import LayerGeometry, register_initializer
from .weight_only import singular_triplet_factors


@dataclass
class FisherEigOptions:
    """Options of `fisher_eig`.

    Attributes:
        scale: "projection" (the adapter holds `W` projected onto the sensitive output/input
            eigenspaces, `P_G W P_A`) or "unit" (the factors are the eigenvectors times `gamma`).
        gamma: factor multiplier of the "unit" rule.
    """

    flag_prefix: ClassVar[str] = "eig"
    scale: Literal["projection", "unit"] = field(default="projection", metadata={"help": "fisher_eig scale rule"})
    gamma: float = field(default=1.0, metadata={"help": "fisher_eig factor multiplier of the unit rule"})

    def __post_init__(self) -> None:
        check_literals(self)


@dataclass
class FisherGradOptions:
    """Options of `fisher_grad`.

    Attributes:
        scale: "stable" (LoRA-GA's rule, arXiv 2407.05000 section 3.3: each factor has orthonormal
            directions times `d_out**0.25 / sqrt(gamma)`), "unit" (orthonormal directions) or
            "spectrum" (the product equals `step` times the rank-r natural-gradient approximation).
        gamma: the `gamma` of the "stable" rule (LoRA-GA's default is 16).
        step: learning-rate-like multiplier of the "spectrum" rule.
    """

    flag_prefix: ClassVar[str] = "grad"
    scale: Literal["stable", "unit", "spectrum"] = field(default="stable",
                                                         metadata={"help": "fisher_grad scale rule"})
    gamma: float = field(default=16.0, metadata={"help": "fisher_grad gamma of the stable rule"})
    step: float = field(default=1.0, metadata={"help": "fisher_grad multiplier of the spectrum rule"})

    def __post_init__(self) -> None:
        check_literals(self)
        if self.gamma <= 0:
            raise ValueError(f"FisherGradOptions.gamma must be > 0, got {self.gamma}")


def require_geometry(geometry: LayerGeometry | None) -> LayerGeometry:
    """The geometry of a method that reads statistics (`run_initializer` always passes one)."""
    if geometry is None:  # run_initializer guarantees it; this keeps the type checker honest
        raise ValueError("this initializer needs Fisher statistics")
    return geometry


def fisher_weight_factors(weight: torch.Tensor, geometry: LayerGeometry,
                          rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best rank-r approximation of `W` in the Fisher norm, `G^-1/2 U_r S_r V_r^T A^-1/2` with
    `U S V^T = svd(G^1/2 W A^1/2)` (Eckart-Young in whitened coordinates), in factored form.

    Computed with any square roots `R R^T` of the damped factors (Cholesky factors, see
    `linalg.Whitening`): with `U S V^T = svd(R_G^T W R_A)`, the product `R_G^-T U_r S_r V_r^T R_A^-1`
    and the singular values are the same for every choice of roots; only the narrower side's root is
    formed (`LayerGeometry.weight_spectrum`).

    Returns:
        `left = R_G^-T U_r` `(d_out, r)`, `S_r` `(r,)`, `right = R_A^-T V_r` `(d_in, r)`, float64, with
        `left diag(S_r) right^T` the approximation.
    """
    return geometry.weight_spectrum(weight, rank).leading(rank)


def natural_gradient_factors(geometry: LayerGeometry, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rank-r natural-gradient approximation `R = G^-1/2 U_r S_r V_r^T A^-1/2` in factored form.

    `U S V^T = svd(G^-1/2 M A^-1/2)` (damped factors): `R` is the best rank-r approximation, in the
    Fisher norm, of the natural-gradient direction `G^-1 M A^-1` (K-FAC, Martens & Grosse 2015).
    Computed with Cholesky factors `R R^T` of the damped factors as `svd(R_G^-1 M R_A^-T)` (the same
    `R` and singular values for every choice of roots, see `linalg.Whitening`), from the narrower
    side's Gram matrix (`linalg.inverse_whitened_triplets`).

    Returns:
        `left = R_G^-T U_r` `(d_out, r)`, `S_r` `(r,)`, `right = R_A^-T V_r` `(d_in, r)`, float64, with
        `left diag(S_r) right^T = R`.
    """
    grad_mean = geometry.grad_mean
    if grad_mean is None:  # run_initializer refuses this earlier, naming the module
        raise ValueError("the natural gradient needs grad_mean (collect with collect_grad_mean=True)")
    return inverse_whitened_triplets(grad_mean, geometry.grad_whitening, geometry.act_whitening, rank)


@register_initializer(
    "fisher_svd",
    "Fisher-weighted PiSSA: best rank-r approximation of W in the Fisher norm (SVD of G^1/2 W A^1/2), balanced",
    benchmark_variants=("@true", "+alloc"),
)
def fisher_svd(weight: torch.Tensor, geometry: LayerGeometry | None, rank: int, scaling: float,
               options: object) -> tuple[torch.Tensor, torch.Tensor]:
    # Un-whiten: s B A = G^-1/2 U_r S_r V_r^T A^-1/2, the Eckart-Young optimum in the Fisher norm.
    return balanced_factors(*fisher_weight_factors(weight, require_geometry(geometry), rank), scaling)


SELECT_BAND = 0.2
"""`fisher_select` refines every triplet whose float32 score is within this fraction of the `r`-th largest
(at least `r + 4`), and their near-equal neighbours; it trusts the choice when every triplet left out
scores (float32) half the band below the `r`-th exact score. The float32 scores of the triplets near
that cut (exact score at least half the `r`-th) are within 0.12% of the exact ones on every linear
layer of SmolLM2-135M (0.01% on MiniLM-L6), almost 100 times less."""
_SELECT_EXTRA = 4
_NEIGHBOUR = 1e-4  # eigenvalues within this times the largest: a pair float32 may mix (relative gap)


@register_initializer(
    "fisher_select",
    "W's own singular triplets ranked by Fisher sensitivity sigma^2 (u^T G u)(v^T A v) instead of sigma",
    benchmark_variants=("+alloc",),
)
def fisher_select(weight: torch.Tensor, geometry: LayerGeometry | None, rank: int, scaling: float,
                  options: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Every singular triplet of `W` is scored, so all of them are needed: from the eigenvectors of the
    smaller Gram matrix (`W^T W` for `d_out >= d_in`: `V` and `W V = U S`). The scores need no division,
    `sigma_i^2 (u_i^T G u_i)(v_i^T A v_i) = (v_i^T (W^T G W) v_i)(v_i^T A v_i)`, and take the weight's Gram
    matrix in the metric of the wider factor (`LayerGeometry.weight_gram`, in float32 for a large
    layer: a choice changes only between triplets whose scores tie to ~1e-6) and the narrower factor
    itself, `(n, n)` both; the Fisher norm of `W` (the captured energy's denominator) is their inner
    product, `tr(W^T G W A)`.

    The ranking takes a float32 eigendecomposition (half the float64 time); the candidates (`SELECT_BAND`)
    are refined in float64 and checked (`stats.refine`), scored exactly, and the `r` best taken. When a
    candidate does not pass its check, or a triplet left out scores within half the band of the `r`-th
    in float32, the float64 decomposition instead. When a chosen `sigma_i < 1e-4 sigma_1` (the Gram matrix
    resolves those only to `eps sigma_1^2`), from a full SVD of `W`.
    """
    geometry = require_geometry(geometry)
    tall = weight.shape[0] >= weight.shape[1]
    matrix = weight if tall else weight.T  # (wide, narrow)
    fisher_gram = geometry.weight_gram(weight)  # W^T G W (tall) or W A W^T
    side = geometry.damped_act_cov if tall else geometry.damped_grad_cov
    geometry.fisher_norm_of_weight = float((fisher_gram * side).sum())
    found = _refined_choice(matrix, fisher_gram, side, rank)
    narrow, largest = found if found is not None else _float64_choice(matrix, fisher_gram, side, rank)
    far = matrix @ narrow  # W V = U S (tall) or W^T U = V S, the chosen columns
    singular_values = far.norm(dim=0)
    if float(singular_values.min()) <= 1e-4 * largest:
        return _select_from_svd(weight, geometry, rank, scaling)
    far_unit = far / singular_values
    left, right = (far_unit, narrow) if tall else (narrow, far_unit)
    half = torch.sqrt(singular_values / scaling)
    return half[:, None] * right.T, left * half


def _scores(vectors: torch.Tensor, fisher_gram: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """`(v^T F v)(v^T S v)` of each column `v` of `vectors` `(n, k)`, in their dtype."""
    return ((fisher_gram @ vectors) * vectors).sum(dim=0) * ((side @ vectors) * vectors).sum(dim=0)


def _refined_choice(matrix: torch.Tensor, fisher_gram: torch.Tensor, side: torch.Tensor,
                    rank: int) -> tuple[torch.Tensor, float] | None:
    """The chosen `V` `(n, r)` float64 and `sigma_1` from a float32 eigendecomposition of `M^T M` and the
    candidates refined in float64, or None where the float64 decomposition must decide."""
    narrow32 = matrix.float()
    values, vectors = torch.linalg.eigh(narrow32.T @ narrow32)  # ascending
    approximate = _scores(vectors, fisher_gram.float(), side.float()).double()
    order = torch.argsort(approximate, descending=True)
    cut = float(approximate[order[rank - 1]])
    if not cut > 0:  # no sensitivity to rank by
        return None
    candidates = torch.zeros_like(approximate, dtype=torch.bool)
    candidates[order[:rank + _SELECT_EXTRA]] = True
    candidates |= approximate >= cut / (1 + SELECT_BAND)
    values = values.double()
    largest = float(values[-1].clamp_min(0))
    close = (values[:, None] - values[candidates][None, :]).abs() <= _NEIGHBOUR * largest
    candidates |= close.any(dim=1)
    chosen = torch.nonzero(candidates).flatten()
    if chosen.numel() > max(4 * rank, rank + 16):  # many near-ties: not worth refining one by one
        return None
    refined = refine_eigenvectors(lambda block: matrix.T @ (matrix @ block), vectors, values, chosen)
    if refined is None:
        return None
    exact = _scores(refined[1], fisher_gram, side)
    best = torch.argsort(exact, descending=True)[:rank]
    left_out = approximate[~candidates]
    if left_out.numel() and float(left_out.max()) * (1 + SELECT_BAND / 2) > float(exact[best[-1]]):
        return None
    return refined[1][:, best], largest**0.5


def _float64_choice(matrix: torch.Tensor, fisher_gram: torch.Tensor, side: torch.Tensor,
                    rank: int) -> tuple[torch.Tensor, float]:
    """The chosen `V` `(n, r)` and `sigma_1` from a full float64 `eigh` of `M^T M`."""
    values, vectors = torch.linalg.eigh(matrix.T @ matrix)
    chosen = torch.argsort(_scores(vectors, fisher_gram, side), descending=True)[:rank]
    return vectors[:, chosen], float(values[-1].clamp_min(0).sqrt())


def _select_from_svd(weight: torch.Tensor, geometry: LayerGeometry, rank: int,
                     scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    left, singular_values, right_transposed = torch.linalg.svd(weight, full_matrices=False)
    output_sensitivity = ((geometry.damped_grad_cov @ left) * left).sum(dim=0)
    input_sensitivity = ((right_transposed @ geometry.damped_act_cov) * right_transposed).sum(dim=1)
    scores = singular_values.square() * output_sensitivity * input_sensitivity
    chosen = torch.argsort(scores, descending=True)[:rank]
    return singular_triplet_factors(weight, chosen, scaling, svd=(left, singular_values, right_transposed))


@register_initializer(
    "fisher_eig",
    "adapter spans the top-r eigenvectors of G (output side) and of A (input side); scale per --eig-scale",
    options=FisherEigOptions,
    benchmark_variants=("+alloc",),
)
def fisher_eig(weight: torch.Tensor, geometry: LayerGeometry | None, rank: int, scaling: float,
               options: object) -> tuple[torch.Tensor, torch.Tensor]:
    geometry = require_geometry(geometry)
    assert isinstance(options, FisherEigOptions)
    _, output_directions = geometry.top_grad_eigenpairs(rank)  # (d_out, r)
    _, input_directions = geometry.top_act_eigenpairs(rank)  # (d_in, r)
    output_directions = output_directions.to(weight.dtype)
    input_directions = input_directions.to(weight.dtype)
    if options.scale == "unit":
        gamma = options.gamma
        return gamma * input_directions.T, gamma * output_directions
    # "projection": the adapter holds W restricted to the sensitive subspaces, P_G W P_A.
    core = output_directions.T @ weight @ input_directions
    core_left, core_values, core_right_transposed = torch.linalg.svd(core)
    half = torch.sqrt(core_values / scaling)
    lora_b = (output_directions @ core_left) * half
    lora_a = half[:, None] * (core_right_transposed @ input_directions.T)
    return lora_a, lora_b


@register_initializer(
    "fisher_grad",
    "natural-gradient spectral init: best rank-r Fisher-norm approximation of G^-1 M A^-1; scale per --grad-scale",
    statistics=KRONECKER_AND_GRADIENT,
    options=FisherGradOptions,
    benchmark_variants=("@true", "+alloc"),
)
def fisher_grad(weight: torch.Tensor, geometry: LayerGeometry | None, rank: int, scaling: float,
                options: object) -> tuple[torch.Tensor, torch.Tensor]:
    assert isinstance(options, FisherGradOptions)
    left_factor, singular_values, right_factor = natural_gradient_factors(require_geometry(geometry), rank)
    if options.scale == "spectrum":
        return balanced_factors(left_factor, options.step * singular_values, right_factor, scaling)
    directions_b, _, directions_a = balanced_directions(left_factor, singular_values, right_factor)
    if options.scale == "unit":
        return directions_a, directions_b
    # "stable" (LoRA-GA): both factors scaled by d_out^(1/4) / sqrt(gamma).
    factor = weight.shape[0] ** 0.25 / options.gamma**0.5
    return factor * directions_a, factor * directions_b
