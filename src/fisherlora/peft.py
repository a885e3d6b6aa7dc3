"""PEFT plumbing: find LoRA layers and write A/B/residual (converting and saving: `conversion.py`;
re-created ranks: `peft_ranks.py`)."""

from __future__ import annotations

import time
import warnings
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .base_weight_guards import (
    check_adapter_is_alone_and_at_zero,
    shared_weight_names,
)
from .config import FisherConfig
from .init.geometry import FactorCache, WeightSpectrum
from .init.registry import compute_factors, get_initializer
from .peft_ranks import fisher_ranks, record_ranks, resize_adapter
from .phases import phase
from .stats.collect import TargetLayer
from .stats.container import FisherStats, fingerprints_match, weight_fingerprint
from .stats.layers import check_materialized, layer_type_of, module_weight, weight_matrix
from .terminal import log_line, progress_bars_wanted
from .writes import all_or_nothing

PEFT_PREFIX = "base_model.model."
# `torch.compile(model)` returns a wrapper holding the model as `_orig_mod`; its module names gain this part.
COMPILE_WRAPPER = "_orig_mod"


def _as_any(module: nn.Module) -> Any:
    # PEFT layers carry dynamic attributes (lora_A, r, scaling) that the type checker cannot see.
    return module


def without_compile_wrappers(name: str) -> str:
    """Module name with every `torch.compile` wrapper part (`_orig_mod`) removed, so that a compiled
    model, the model inside it and a model with compiled submodules name their layers alike."""
    return ".".join(part for part in name.split(".") if part != COMPILE_WRAPPER)


def base_name(name: str) -> str:
    """Module name inside the base model: `torch.compile`'s `_orig_mod` parts and PEFT's
    `base_model.model.` prefix removed."""
    name = without_compile_wrappers(name)
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The model inside `torch.compile` wrappers (their `_orig_mod`), else `model` itself."""
    while isinstance(getattr(model, COMPILE_WRAPPER, None), nn.Module):
        model = getattr(model, COMPILE_WRAPPER)
    return model


def _lora_layer_class() -> type:
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a `PeftModel`, or a `torch.compile` wrapper around one."""
    from peft import PeftModel

    return isinstance(unwrap_compiled(model), PeftModel)


def has_lora_layers(model: nn.Module) -> bool:
    """Whether `model` is a PEFT model or holds PEFT LoRA layers (else a plain model)."""
    lora_layer: Any = _lora_layer_class()
    return is_peft_model(model) or any(isinstance(module, lora_layer) for module in model.modules())


def find_target_layers(
    model: nn.Module, adapter_name: str = "default", target_modules: Iterable[str] | str | None = None
) -> list[TargetLayer]:
    """The layers statistics are collected for and adapters are written to.

    For a PEFT model: every LoRA layer holding `adapter_name`. For a plain model: the modules
    matched by `target_modules` (PEFT's own matching rules: a list of name suffixes or a regex).
    Names are those of the base model (`base_name`), also for a `torch.compile`d model.

    Raises:
        ValueError: no layer is targeted. TypeError: a targeted module has an unsupported type
        (named with its type) or a non-floating-point weight.
    """
    lora_layer: Any = _lora_layer_class()
    targets: list[TargetLayer] = []
    if has_lora_layers(model):
        if target_modules is not None:
            raise ValueError("target_modules is only for plain models; a PEFT model's LoraConfig already names them")
        for name, module in model.named_modules():
            # LoRA on embeddings keeps its factors in lora_embedding_A: include it, so that the
            # unsupported type is refused by name instead of silently skipped.
            if not isinstance(module, lora_layer):
                continue
            if adapter_name in module.lora_A or adapter_name in getattr(module, "lora_embedding_A", {}):
                base = module.get_base_layer()
                if getattr(module, "use_dora", {}).get(adapter_name, False):
                    raise TypeError(f"module {name!r} uses DoRA; fisherlora initializes plain LoRA adapters only")
                targets.append(TargetLayer(base_name(name), module, base, layer_type_of(base_name(name), base)))
        if not targets:
            raise ValueError(f"the PEFT model has no LoRA layer with adapter {adapter_name!r}")
    else:
        if target_modules is None:
            raise ValueError("a plain (non-PEFT) model needs target_modules=[...] to know which layers to use")
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel

        probe = LoraConfig(target_modules=target_modules if isinstance(target_modules, str) else list(target_modules))
        for raw_name, module in model.named_modules():
            name = without_compile_wrappers(raw_name)
            if name and LoraModel._check_target_module_exists(probe, name):
                if not hasattr(module, "weight") and isinstance(module, nn.ModuleDict | nn.ModuleList | nn.Sequential):
                    continue
                targets.append(TargetLayer(name, module, module, layer_type_of(name, module)))
        if not targets:
            raise ValueError(f"no module of the model matches target_modules={target_modules!r}")
    for target in targets:
        weight = module_weight(target.weight_module)
        if not weight.is_floating_point():
            raise TypeError(
                f"module {target.name!r} has a {weight.dtype} weight: not floating point (quantized?); "
                "fisherlora needs a floating-point base weight"
            )
    return targets


@dataclass
class LayerReport:
    """What `initialize_lora_fisher` did to one layer.

    Attributes:
        name: module name in the base model.
        rank: LoRA rank.
        scaling: LoRA scaling `s`.
        captured_energy: fraction of `||W||^2` in the Fisher norm held by the adapter (None for
            data-free methods, and for every method unless `FisherConfig.captured_energy` asked for it).
        damping_added: absolute damping added to `(A, G)`.
        untied_from: the parameters this layer's weight was tied to (shared storage, e.g. the input
            embedding of a model with `tie_word_embeddings=True`): the layer got its own copy
            before its residual was written, and those parameters kept `W`. Empty if not tied.
        residual_rounding: `||round(W - s B A) + s B A - W||_F / ||W||_F`, the residual's rounding to the
            weight's dtype (`WriteLog.write_residual`): how far the layer's function at step 0 is from
            the original's, about 1e-7 in float32, about 2e-3 in bfloat16. None where no residual was written.
    """

    name: str
    rank: int
    scaling: float
    captured_energy: float | None
    damping_added: tuple[float, float] | None
    untied_from: list[str] = field(default_factory=list)
    residual_rounding: float | None = None

    def __str__(self) -> str:
        energy = "-" if self.captured_energy is None else f"{self.captured_energy:.3f}"
        damping = "-" if self.damping_added is None else f"A+{self.damping_added[0]:.2e}, G+{self.damping_added[1]:.2e}"
        untied = f"; weight untied from {', '.join(self.untied_from)}" if self.untied_from else ""
        return f"{self.name}: r={self.rank} s={self.scaling:g} fisher energy={energy} damping {damping}{untied}"


# Per layer (base name): the initial A0, B0 (float32, CPU) whose product s B0 A0 was subtracted from the base
# weight, and the scaling s, for save_as_lora. B0 is stored as zero where nothing was subtracted (a method that
# takes a real first step, such as LoRA-One): then the base weight is the original one.
InitialFactors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]

# Initial factors per PEFT model object and adapter, kept outside the modules and dropped with the model.
_INITIAL_STATES: weakref.WeakKeyDictionary[nn.Module, dict[str, InitialFactors]] = weakref.WeakKeyDictionary()


def _to_lora_shapes(layer: Any, adapter: str, lora_a: torch.Tensor,
                    lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    target_a = layer.lora_A[adapter].weight
    target_b = layer.lora_B[adapter].weight
    return lora_a.reshape(target_a.shape), lora_b.reshape(target_b.shape)


def check_statistics_match(stats: FisherStats, targets: list[TargetLayer]) -> None:
    """Refuse statistics collected on another model: names, shapes and weight fingerprints."""
    for target in targets:
        if target.name not in stats.layers:
            raise ValueError(
                f"the statistics have no entry for module {target.name!r} (they cover {sorted(stats.layers)[:5]}...); "
                "were they collected for other target modules?"
            )
        layer = stats.layers[target.name]
        weight = weight_matrix(target.weight_module, target.layer_type)
        if tuple(layer.weight_shape) != tuple(weight.shape):
            raise ValueError(
                f"statistics for module {target.name!r} were collected on a weight of shape "
                f"{tuple(layer.weight_shape)}, the model's is {tuple(weight.shape)}: a different model"
            )
        if layer.fingerprint and not fingerprints_match(layer.fingerprint, weight_fingerprint(weight),
                                                        (layer.weight_shape[0], layer.weight_shape[1])):
            raise ValueError(
                f"statistics for module {target.name!r} do not match the model's weight fingerprint: they were "
                "collected on a different checkpoint, or this model was already initialized (its weight is a "
                "residual); a different dtype of the same checkpoint (bf16 vs fp32) is not the cause, it matches"
            )


def check_can_initialize(model: nn.Module, adapter_name: str = "default") -> list[TargetLayer]:
    """The layers of `adapter_name`, once it is known that writing their residuals changes no
    other output: every weight materialized, no other adapter on them, and the adapter at zero.

    Raises:
        StatisticsError: a partitioned or unmaterialized weight (ZeRO-3/FSDP shard, meta tensor),
            named, whether or not statistics were collected in this process.
        ValueError: see `base_weight_guards.check_adapter_is_alone_and_at_zero`; also those of
            `find_target_layers`.
        TypeError: a model without LoRA layers (a plain model: wrap it with `peft.get_peft_model`).
    """
    if not has_lora_layers(model):
        raise TypeError(f"initialization writes into a LoRA adapter, and this {type(model).__name__} has none: "
                        "wrap it first, model = peft.get_peft_model(model, LoraConfig(target_modules=[...], ...)) "
                        "(collect_fisher alone also takes a plain model with target_modules=[...])")
    targets = find_target_layers(model, adapter_name)
    for target in targets:
        check_materialized(target.name, target.weight_module, target.layer_type)
    check_adapter_is_alone_and_at_zero(targets, adapter_name)
    return targets


RESIDUAL_ROUNDING_WARNING = 1e-5
"""`write_adapters` warns when a residual's rounding (`LayerReport.residual_rounding`) exceeds this:
float32 rounds by ~1e-7, bfloat16 and float16 by ~1e-3."""


def warn_if_rounded(rounding: dict[str, float]) -> None:
    """Warn, naming the worst layer, when a residual written in a low-precision dtype changed the function."""
    if not rounding:
        return
    worst = max(rounding, key=rounding.__getitem__)
    if rounding[worst] > RESIDUAL_ROUNDING_WARNING:
        warnings.warn(
            f"the residual base weights W - s B A were rounded to the model's dtype: W_res + s B A differs from W by "
            f"up to {rounding[worst]:.1e} of ||W|| (relative Frobenius norm, module {worst!r}), so the model's "
            "outputs at step 0 are not exactly the original's; a float32 model starts exactly "
            "(LayerReport.residual_rounding has every layer's)",
            stacklevel=4,  # the caller of initialize_lora_fisher
        )


def write_adapters(
    model: nn.Module, stats: FisherStats | None, config: FisherConfig, adapter_name: str = "default"
) -> list[LayerReport]:
    """Compute every targeted layer's factors, then write them with the residuals; all or nothing.

    All factors are computed and checked before the first write (they are small); the residual
    `W - s B A` is then formed and written one layer at a time, so memory grows by about one layer,
    not by a copy of every targeted weight. A layer that fails while being written (out of memory,
    an interrupt) rolls back every layer written before it, bit for bit (`writes.WriteLog`). A layer
    whose weight is tied to another parameter gets its own copy first (with a warning, and named in
    its `LayerReport.untied_from`), so the other keeps `W`. With `config.rank_allocation="fisher"` each
    adapter is re-created at its allocated rank (`peft_ranks.py`) and the ranks are recorded in the
    adapter config's `rank_pattern`/`alpha_pattern`.
    """
    initializer = get_initializer(config.method)
    targets = check_can_initialize(model, adapter_name)
    if stats is not None:
        check_statistics_match(stats, targets)
    elif initializer.statistics_needed(config):
        raise ValueError(f"method {config.method!r} (rank_allocation={config.rank_allocation!r}) needs statistics "
                         "or a dataloader")
    ranks: dict[str, int] = {}
    spectra: dict[str, WeightSpectrum] = {}
    if stats is not None and config.rank_allocation == "fisher":
        with phase("factorization"):  # the energies: the factors' roots and the weights' spectra
            ranks, spectra = fisher_ranks(targets, stats, config, adapter_name)
    planned = []
    # A factor shared by layers (the A of query/key/value) is factorized once, and dropped after its last layer.
    cache = FactorCache([stats.layers[target.name] for target in targets]) if stats is not None else None
    start = time.perf_counter()
    for target in _layer_progress(targets, config.progress, config.method):
        layer: Any = target.hook_module
        rank = ranks.get(target.name, int(layer.r[adapter_name]))
        scaling = float(layer.scaling[adapter_name])
        weight = weight_matrix(target.weight_module, target.layer_type)
        with phase("factorization"):
            factors = compute_factors(
                config.method,
                weight,
                stats.layers[target.name] if stats is not None else None,
                rank,
                scaling,
                config,
                module_name=target.name,
                factor_dtype=layer.lora_A[adapter_name].weight.dtype,
                cache=cache,
                spectrum=spectra.get(target.name),
            )
        if cache is not None and stats is not None:
            cache.done(stats.layers[target.name])
        planned.append((target, rank, factors))
    if config.progress and not progress_bars_wanted(True):
        log_line(f"{config.method}: factors of {len(targets)} layers, {time.perf_counter() - start:.1f} s")
    tied = {name: [base_name(other) for other in others]
            for name, others in shared_weight_names(model, targets).items()}
    peft_config = _as_any(unwrap_compiled(model)).peft_config[adapter_name]
    rounding: dict[str, float] = {}
    with all_or_nothing() as log:
        for target, rank, factors in planned:
            layer = target.hook_module
            if rank != int(layer.r[adapter_name]):
                log.keep_adapter(layer, adapter_name)
                resize_adapter(layer, adapter_name, rank, peft_config)
            lora_a, lora_b = _to_lora_shapes(layer, adapter_name, factors.lora_a, factors.lora_b)
            log.copy_into(layer.lora_A[adapter_name].weight, lora_a)
            log.copy_into(layer.lora_B[adapter_name].weight, lora_b)
            if not factors.preserves_function:
                continue  # no residual: the base weight stays W
            if target.name in tied:
                log.untie(model, target.weight_module)
                warnings.warn(
                    f"module {target.name!r} shares its weight with {tied[target.name]} (tied weights): it got its "
                    "own copy before its residual was written, so those keep W (one more weight matrix in memory; "
                    "a tied output embedding also gets config.tie_word_embeddings = False)",
                    stacklevel=3,
                )
            rounding[target.name] = log.write_residual(target.weight_module, target.layer_type, factors.product)
    warn_if_rounded(rounding)
    reports = []
    initial: InitialFactors = {}
    for target, rank, factors in planned:
        lora_a, lora_b = _to_lora_shapes(target.hook_module, adapter_name, factors.lora_a, factors.lora_b)
        subtracted_b = lora_b if factors.preserves_function else torch.zeros_like(lora_b)
        initial[target.name] = (lora_a.detach().float().cpu().clone(), subtracted_b.detach().float().cpu().clone(),
                                factors.scaling)
        reports.append(LayerReport(target.name, rank, factors.scaling, factors.captured_energy, factors.damping_added,
                                   untied_from=tied.get(target.name, []) if factors.preserves_function else [],
                                   residual_rounding=rounding.get(target.name)))
    if ranks:
        layers = [_as_any(target.hook_module) for target in targets]
        record_ranks(peft_config, {target.name: (int(layer.r[adapter_name]), float(layer.lora_alpha[adapter_name]))
                                   for target, layer in zip(targets, layers, strict=True)})
    _INITIAL_STATES.setdefault(unwrap_compiled(model), {})[adapter_name] = initial
    return reports


def _layer_progress(targets: list[TargetLayer], show: bool, method: str) -> Iterator[TargetLayer]:
    """`targets`, with a bar naming each layer while its factors are computed (on a terminal, when asked)."""
    from tqdm.auto import tqdm

    bar = tqdm(targets, desc=method, unit="layer", disable=not progress_bars_wanted(show))
    for target in bar:
        bar.set_postfix_str(target.name, refresh=False)
        yield target


def _initial_factors(model: nn.Module, adapter_name: str) -> InitialFactors:
    factors = _INITIAL_STATES.get(unwrap_compiled(model), {}).get(adapter_name)
    if factors is None:
        raise ValueError(
            f"adapter {adapter_name!r} was not initialized by fisherlora.initialize_lora_fisher in this process; "
            "pass initial_adapter= (the adapter saved right after initialization), or, for a plain LoRA "
            "adapter that needs no conversion, use model.save_pretrained"
        )
    return factors


def base_weights_changed(model: nn.Module, adapter_name: str = "default") -> bool:
    """Whether `initialize_lora_fisher` (in this process) wrote a residual `W - s B0 A0 != W` into some base
    weight: False for zero-start methods and for methods that take a real first step (LoRA-One, LoRA-DA),
    whose base weights are the original ones.

    Raises:
        ValueError: the adapter was not initialized by `initialize_lora_fisher` in this process.
    """
    return any(bool(initial_b.any()) for _, initial_b, _ in _initial_factors(model, adapter_name).values())
