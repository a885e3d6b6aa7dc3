"""The initializer registry and the checks every initializer goes through."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..config import FisherConfig
from ..stats.container import LayerStats
from ..stats.linalg import low_rank_fisher_norm_squared
from .catalog import (
    CATALOG,
    KRONECKER,
    Family,
    MethodEntry,
    Statistic,
    add_entry,
    ordered_entries,
    unknown_name_error,
)
from .geometry import FactorCache, LayerGeometry, WeightSpectrum


@dataclass
class InitResult:
    """Adapter factors and residual for one layer, `W == residual + scaling * lora_b @ lora_a`.

    Attributes:
        lora_a: `(r, d_in)`.
        lora_b: `(d_out, r)`.
        residual: `(d_out, d_in)`.
        captured_energy: `||s B A||_F^2 / ||W||_F^2` in the Fisher norm (None without statistics, or
            unless `FisherConfig.captured_energy` asked for it).
        damping_added: absolute damping added to `A` and `G` (None without statistics).
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    residual: torch.Tensor
    captured_energy: float | None = None
    damping_added: tuple[float, float] | None = None


@dataclass
class LayerFactors:
    """Adapter factors for one layer, before the residual is formed (small: `r (d_out + d_in)` floats).

    Attributes:
        lora_a: `(r, d_in)` float32 holding exact values of the adapter's dtype.
        lora_b: `(d_out, r)`, likewise.
        scaling: LoRA scaling `s`.
        preserves_function: the residual is `W - s B A` (else `W`).
        captured_energy, damping_added: as in `InitResult`.
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    preserves_function: bool
    captured_energy: float | None = None
    damping_added: tuple[float, float] | None = None

    def product(self) -> torch.Tensor:
        """`s B A` `(d_out, d_in)` float64."""
        return self.scaling * (self.lora_b.double() @ self.lora_a.double())

    def residual(self, weight: torch.Tensor) -> torch.Tensor:
        """`W - s B A` `(d_out, d_in)` float32 (formed in float64), or `W` for a method that keeps it."""
        matrix = weight.detach().double()
        if not self.preserves_function:
            return matrix.float()
        return (matrix - self.product()).float()


InitFunction = Callable[[torch.Tensor, LayerGeometry | None, int, float, Any], tuple[torch.Tensor, torch.Tensor]]
"""`(W (d_out, d_in) float64, geometry or None, r, s, options) -> (A (r, d_in), B (d_out, r))`."""

class _Initializers(Mapping[str, MethodEntry]):
    """The catalogue's entries implemented here as pure functions (a live view: a method
    registered later appears at once)."""

    def __getitem__(self, name: str) -> MethodEntry:
        entry = CATALOG[name]
        if entry.function is None:
            raise KeyError(name)
        return entry

    def __iter__(self) -> Iterator[str]:
        return (entry.name for entry in ordered_entries() if entry.function is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


INITIALIZERS: Mapping[str, MethodEntry] = _Initializers()


def register_initializer(
    name: str,
    description: str,
    *,
    family: Family = "fisher",
    statistics: tuple[Statistic, ...] = KRONECKER,
    zero_start: bool = False,
    preserves_function: bool = True,
    balanced_factors: bool = True,
    options: type | None = None,
    benchmark_variants: tuple[str, ...] = (),
    statistics_for: Callable[[Any], tuple[Statistic, ...]] | None = None,
) -> Callable[[InitFunction], InitFunction]:
    """Decorator adding a pure-function initializer to the method catalogue, and so to
    `fisherlora.METHODS`, the command line, the benchmark presets, the report and the test sweeps.

    Args:
        name: the method name.
        description: one line for `fisherlora methods` and the README.
        family: "fisher" (this project's), "paper" (a published method re-implemented here) or
            "weight" (weight-only, needs no data).
        statistics: which of `A`, `G`, `M` it reads (`()`: none; then it sees no data).
        zero_start: it returns `B = 0` (the base weight stays as it is).
        preserves_function: `W - s B A` is written as the residual so the outputs are unchanged; False
            for methods whose adapter is a real first step (no residual).
        balanced_factors: its non-zero factors have equal Frobenius norms (False only for a published
            method whose own factors are not balanced).
        options: its options dataclass (`FisherConfig.options`); the function receives an instance.
        benchmark_variants: suffixes the benchmark also runs (e.g. `("@true",)`).
        statistics_for: `statistics_for(options) -> statistics` when what it reads depends on its
            options (then `statistics` is the union over the options).
    """

    def decorate(function: InitFunction) -> InitFunction:
        add_entry(MethodEntry(name=name, family=family, description=description, zero_start=zero_start,
                              preserves_function=preserves_function, balanced_factors=balanced_factors,
                              statistics=statistics,
                              uses_data=bool(statistics), options=options, function=function,
                              benchmark_variants=benchmark_variants, statistics_for=statistics_for))
        return function

    return decorate


def get_initializer(name: str) -> MethodEntry:
    """The catalogue entry of one of this project's initializers.

    Raises:
        ValueError: unknown name, or a method that runs through PEFT (both with the valid names).
    """
    if name not in INITIALIZERS:
        raise unknown_name_error("initializer", name, list(INITIALIZERS))
    return INITIALIZERS[name]


def compute_factors(
    method: str,
    weight: torch.Tensor,
    stats: LayerStats | None,
    rank: int,
    scaling: float,
    config: FisherConfig,
    module_name: str = "<layer>",
    factor_dtype: torch.dtype = torch.float32,
    cache: FactorCache | None = None,
    spectrum: WeightSpectrum | None = None,
) -> LayerFactors:
    """Validate the inputs, run one initializer, and return its factors (the residual is formed later,
    one layer at a time: `LayerFactors.residual`).

    Args:
        method: registered initializer name.
        weight: `(d_out, d_in)` floating-point weight.
        stats: the layer's statistics (required when the method needs them); dense or sketched, on any
            device (moved to the weight's device one layer at a time).
        rank: LoRA rank `r`, `1 <= r <= min(d_out, d_in)`.
        scaling: LoRA scaling `s` (`alpha / r`, or `alpha / sqrt(r)` with rsLoRA).
        config: the `FisherConfig` (damping, and the method's `options`).
        module_name: named in error messages.
        factor_dtype: dtype the adapter stores `A` and `B` in (e.g. bfloat16): the factors are rounded
            to it before the residual is formed.
        cache: work on factors shared by several layers (see `FactorCache`), kept across calls.
        spectrum: this weight's leading Fisher-norm singular triplets when already computed (by the
            rank allocation; see `LayerGeometry.weight_spectrum`), used when it holds enough of them.

    Returns:
        `LayerFactors`; its `residual(W)` gives `residual + s * B @ A == W` up to float32 rounding of
        the residual (the factors are exact values of `factor_dtype`, held in float32) for a
        function-preserving method, and `W` for one that is not (its adapter is a real step away).

    Raises:
        ValueError: unknown method, bad shapes or rank, missing statistics, or inputs the method
            cannot use (named with the method and module); TypeError: a non-float
        weight or another method's options; FloatingPointError: non-finite factors.
    """
    initializer = get_initializer(method)
    options = initializer.resolve_options(config.options)
    if weight.dim() != 2:
        raise ValueError(f"module {module_name!r}: expected a (d_out, d_in) weight, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(
            f"module {module_name!r} has a {weight.dtype} weight: not floating point (quantized?); "
            "initialize in float32/bfloat16 and quantize the residual afterwards"
        )
    d_out, d_in = weight.shape
    if not 1 <= rank <= min(d_out, d_in):
        raise ValueError(f"module {module_name!r}: rank r={rank} must be between 1 and min(d_out={d_out}, d_in={d_in})")
    if scaling <= 0:
        raise ValueError(f"module {module_name!r}: LoRA scaling must be > 0, got {scaling}")
    geometry = None
    needed = initializer.statistics_with(options)
    if needed:
        if stats is None:
            raise ValueError(f"method {method!r} needs Fisher statistics for module {module_name!r}; none were given")
        if tuple(stats.weight_shape) != (d_out, d_in):
            raise ValueError(
                f"statistics for module {module_name!r} have weight shape {tuple(stats.weight_shape)}, "
                f"the layer has {(d_out, d_in)}"
            )
        if "grad_mean" in needed and stats.grad_mean is None:
            raise ValueError(
                f"method {method!r} needs grad_mean for module {module_name!r}: collect with collect_grad_mean=True"
            )
        geometry = LayerGeometry(stats, config.damping, device=weight.device, cache=cache, spectrum=spectrum)
    matrix = weight.detach().double()
    assert initializer.function is not None
    try:
        lora_a, lora_b = initializer.function(matrix, geometry, rank, scaling, options)
    except ValueError as error:  # e.g. a zero gradient, or a rank the method cannot take on this layer
        raise ValueError(f"method {method!r}, module {module_name!r}: {error}") from error
    if lora_a.shape != (rank, d_in) or lora_b.shape != (d_out, rank):
        raise RuntimeError(
            f"initializer {method!r} returned A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)}, "
            f"expected {(rank, d_in)} and {(d_out, rank)}"
        )
    if not (torch.isfinite(lora_a).all() and torch.isfinite(lora_b).all()):
        raise FloatingPointError(f"initializer {method!r} produced non-finite factors for module {module_name!r}")
    # The residual is formed from the factors as they will be stored (factor_dtype), so that
    # residual + s * B @ A reproduces W to the rounding of the residual alone.
    lora_a, lora_b = lora_a.to(factor_dtype).float(), lora_b.to(factor_dtype).float()
    captured = None
    damping_added = None
    if geometry is not None:
        damping_added = geometry.damping_added
        if config.captured_energy:
            captured = _captured_energy(geometry, matrix, scaling * lora_b, lora_a)
    return LayerFactors(lora_a=lora_a, lora_b=lora_b, scaling=scaling,
                        preserves_function=initializer.preserves_function, captured_energy=captured,
                        damping_added=damping_added)


def _captured_energy(geometry: LayerGeometry, weight: torch.Tensor, scaled_b: torch.Tensor,
                     lora_a: torch.Tensor) -> float:
    """`||G^1/2 (s B A_lora) A^1/2||_F^2 / ||G^1/2 W A^1/2||_F^2` with the damped K-FAC factors `A`, `G`
    (`A_lora` the adapter's `A`), 0 for a zero product."""
    # A zero product (a zero start) holds nothing: the Fisher norm of W, which costs a product of
    # the wider factor with W where no initializer formed it, is not needed.
    if not (bool(scaled_b.any()) and bool(lora_a.any())):
        return 0.0
    held = low_rank_fisher_norm_squared(scaled_b, lora_a, geometry.damped_grad_cov, geometry.damped_act_cov)
    total = geometry.fisher_norm_squared(weight) if held > 0 else 0.0
    return held / total if total > 0 else 0.0


def run_initializer(
    method: str,
    weight: torch.Tensor,
    stats: LayerStats | None,
    rank: int,
    scaling: float,
    config: FisherConfig,
    module_name: str = "<layer>",
    factor_dtype: torch.dtype = torch.float32,
) -> InitResult:
    """`compute_factors` and the residual: `InitResult` with `residual + s * B @ A == W` up to
    float32 rounding for a function-preserving method, `residual == W` for one that is not.

    Raises: as `compute_factors`.
    """
    factors = compute_factors(method, weight, stats, rank, scaling, config, module_name, factor_dtype)
    return InitResult(lora_a=factors.lora_a, lora_b=factors.lora_b, residual=factors.residual(weight),
                      captured_energy=factors.captured_energy, damping_added=factors.damping_added)
