"""The Fisher family's zero-start and first-step members: `fisher_zero` and `fisher_step`.

Both take `W (d_out, d_in)` float64 and a `LayerGeometry`, and return `A (r, d_in)`, `B (d_out, r)`.
Neither writes a residual: `fisher_zero` starts at `B = 0` (the model is unchanged), `fisher_step`
starts one small natural-gradient step away from `W` (LoRA-One, arXiv 2502.01235, with the Fisher).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from ..config import check_literals
from ..stats.linalg import balanced_directions, balanced_factors
from ..stats.top_r import top_singular_triplets
from .catalog import KRONECKER, KRONECKER_AND_GRADIENT, Statistic
from .fisher import fisher_weight_factors, natural_gradient_factors, require_geometry
from .registry import LayerGeometry, register_initializer

PEFT_DEFAULT_A_ROW_NORM = 3**-0.5
"""Root-mean-square norm of a row of PEFT's default `A`: `reset_lora_parameters` runs
`nn.init.kaiming_uniform_(A, a=sqrt(5))` on the `(r, d_in)` weight (for a convolution
`(r, C_in, kh, kw)`, `d_in = C_in kh kw`), i.e. entries uniform on `[-b, b]` with
`b = sqrt(3) * gain / sqrt(fan_in)`, `gain = sqrt(2 / (1 + a^2)) = sqrt(1/3)`, `fan_in = d_in`: so
`b = 1 / sqrt(d_in)`, each entry has variance `b^2 / 3 = 1 / (3 d_in)` and a row's expected squared
norm is `d_in / (3 d_in) = 1/3`, whatever `d_in`."""

DirectionSource = Literal["weight", "natural_gradient", "gradient"]


@dataclass
class FisherZeroOptions:
    """Options of `fisher_zero`.

    Attributes:
        source: where `A`'s input directions come from: "weight" (the input side of `fisher_svd`'s
            Fisher-optimal rank-r part of `W`), "natural_gradient" (the input side of the rank-r
            natural gradient `G^-1/2 U_r S_r V_r^T A^-1/2`, SVD of `G^-1/2 M A^-1/2`) or "gradient"
            (the top-r right singular vectors of `M`).
    """

    flag_prefix: ClassVar[str] = "zero"
    # Stage 1 (text, lm, vision; seeds 0-2, best LR each) ranked the sources by mean validation metric:
    # natural_gradient 2nd/1st/2nd, gradient 3rd/2nd/1st, weight 1st/3rd/3rd. natural_gradient has the
    # best mean rank and is never last (the README's "fisher_zero's direction source").
    source: DirectionSource = field(default="natural_gradient", metadata={"help": "fisher_zero direction source"})

    def __post_init__(self) -> None:
        check_literals(self)


@dataclass
class FisherStepOptions:
    """Options of `fisher_step`.

    Attributes:
        gamma: the step is `-(s / gamma) R / sigma_1(R)`: its spectral norm is `s / gamma` (LoRA-One's
            `gamma`, whose paper default is 128).
    """

    flag_prefix: ClassVar[str] = "step"
    gamma: float = field(default=128.0, metadata={"help": "fisher_step: the step's spectral norm is s / gamma"})

    def __post_init__(self) -> None:
        if self.gamma <= 0:
            raise ValueError(f"FisherStepOptions.gamma must be > 0, got {self.gamma}")


def _fixed_signs(lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each component (row of `A`, column of `B`) so that the largest-magnitude entry of the row of
    `A` is positive: `B A` is unchanged, and factors defined up to sign (an SVD's) become reproducible."""
    largest = lora_a.gather(1, lora_a.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    signs = torch.where(largest < 0, -1.0, 1.0).to(lora_a.dtype)
    return signs[:, None] * lora_a, lora_b * signs


def _zero_statistics(options: FisherZeroOptions) -> tuple[Statistic, ...]:
    return {"weight": KRONECKER, "natural_gradient": KRONECKER_AND_GRADIENT,
            "gradient": ("grad_mean",)}[options.source]


@register_initializer(
    "fisher_zero",
    "zero start (B = 0): A's rows an orthonormal basis of r Fisher-chosen input directions, PEFT's row norm; "
    "source per --zero-source",
    statistics=KRONECKER_AND_GRADIENT,
    statistics_for=_zero_statistics,
    zero_start=True,
    options=FisherZeroOptions,
    # The protocol presets keep running the other direction sources beside the default.
    benchmark_variants=("+alloc", "+source=weight", "+source=gradient"),
)
def fisher_zero(weight: torch.Tensor, geometry: LayerGeometry | None, rank: int, scaling: float,
                options: object) -> tuple[torch.Tensor, torch.Tensor]:
    """`B = 0` `(d_out, r)`; `A = c Q^T` `(r, d_in)`, `Q` `(d_in, r)` orthonormal, `c = 1/sqrt(3)`.

    `Q` spans the row space of a rank-r matrix chosen by the Fisher, ordered by its singular values:
    - "weight": `G^-1/2 U_r S_r V_r^T A^-1/2` with `U S V^T = svd(G^1/2 W A^1/2)` (`fisher_svd`'s
      product; `A = G = I` gives PiSSA's input directions);
    - "natural_gradient": `G^-1/2 U_r S_r V_r^T A^-1/2` with `U S V^T = svd(G^-1/2 M A^-1/2)`;
    - "gradient": `V_r`, the top-r right singular vectors of `M` (LoRA-GA's `A` directions, arXiv
      2407.05000 section 3.2).
    `c` is the root-mean-square row norm of PEFT's default `A` (`PEFT_DEFAULT_A_ROW_NORM`), so the
    learning rates tuned for LoRA keep their meaning. Like EVA (arXiv 2410.07170), but the input
    directions come from the curvature instead of the activations' variance.
    """
    geometry = require_geometry(geometry)
    assert isinstance(options, FisherZeroOptions)
    d_out = weight.shape[0]
    if options.source == "gradient":
        grad_mean = geometry.grad_mean
        assert grad_mean is not None  # run_initializer refuses a missing M, naming the module
        directions = top_singular_triplets(grad_mean.to(weight.dtype), rank)[2].T
    else:
        factored = (fisher_weight_factors(weight, geometry, rank) if options.source == "weight"
                    else natural_gradient_factors(geometry, rank))
        _, _, directions = balanced_directions(*factored)
    return _fixed_signs(PEFT_DEFAULT_A_ROW_NORM * directions.to(weight.dtype), weight.new_zeros(d_out, rank))


@register_initializer(
    "fisher_step",
    "one small natural-gradient step, no residual: s B A = -(s/gamma) R / sigma_1(R), R the rank-r "
    "natural gradient; balanced",
    statistics=KRONECKER_AND_GRADIENT,
    preserves_function=False,
    options=FisherStepOptions,
    benchmark_variants=("+alloc",),
)
def fisher_step(weight: torch.Tensor, geometry: LayerGeometry | None, rank: int, scaling: float,
                options: object) -> tuple[torch.Tensor, torch.Tensor]:
    """`s B A = -(s / gamma) R / sigma_1(R)`, `A` `(r, d_in)`, `B` `(d_out, r)`, `||A||_F = ||B||_F`.

    `R = G^-1/2 U_r S_r V_r^T A^-1/2` is the rank-r natural gradient (`natural_gradient_factors`) and
    `sigma_1(R)` its largest singular value, so the step's spectral norm is `s / gamma`: LoRA-One's
    initialization (arXiv 2502.01235, `s B A = -(s/gamma) rank_r(M) / S_1`) with the gradient `M`
    replaced by its natural-gradient direction. The base weight is not changed: the model starts at
    `W + s B A`, which lowers the loss to first order (`<M, R> = sum S_r^2 > 0`).

    Raises:
        ValueError: the natural gradient is zero (no direction to step along).
    """
    geometry = require_geometry(geometry)
    assert isinstance(options, FisherStepOptions)
    directions_b, values, directions_a = balanced_directions(*natural_gradient_factors(geometry, rank))
    if not values[0] > 0:
        raise ValueError("fisher_step: the natural gradient is zero (M = 0): there is no step to take")
    # directions_b diag(values) directions_a == R; the step rescales the spectrum and flips the sign.
    core = values * (scaling / (options.gamma * values[0]))
    lora_a, lora_b = balanced_factors(-directions_b, core, directions_a.T, scaling)
    return _fixed_signs(lora_a, lora_b)
