"""Build a LoRA model initialized by any method: PEFT's own baselines through PEFT's own code,
`milora` and the Fisher variants through fisherlora. One function per method, in one registry.

A method name may carry a Fisher type: `fisher_svd@true` is `fisher_svd` with the true Fisher,
a sketch: `fisher_svd+sketch64` keeps every factor wider than 64 as a rank-64 Nystrom sketch, and
a view: `pissa+linear` runs PiSSA on targeted 1x1 convolutions rewritten as `nn.Linear`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..api import initialize_lora_fisher
from ..config import FisherConfig
from ..init.registry import INITIALIZERS
from ..methods import PEFT_BASELINES
from .pointwise import pointwise_convs_as_linear_


@dataclass
class AdapterSpec:
    """What every method shares at a given seed.

    Attributes:
        rank, alpha: LoRA rank and alpha.
        target_modules: module names or a regex (PEFT's rules).
        modules_to_save: trained in full (e.g. a new classification head).
        use_rslora: `alpha / sqrt(r)` scaling.
        causal_lm: the task is next-token prediction (EVA masks labels == -100).
    """

    rank: int = 8
    alpha: int = 16
    target_modules: list[str] | str = field(default_factory=lambda: ["query", "value"])
    modules_to_save: list[str] | None = None
    use_rslora: bool = False
    causal_lm: bool = False

    def lora_config(self, **overrides: Any) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=self.target_modules,
                          modules_to_save=self.modules_to_save, use_rslora=self.use_rslora, lora_dropout=0.0,
                          **overrides)


Builder = Callable[[nn.Module, AdapterSpec, Sequence[Any], FisherConfig], nn.Module]
BUILDERS: dict[str, Builder] = {}


def register_builder(name: str) -> Callable[[Builder], Builder]:
    def decorate(function: Builder) -> Builder:
        BUILDERS[name] = function
        return function

    return decorate


@dataclass(frozen=True)
class MethodName:
    """A benchmark method name taken apart: ``NAME[+sketchK][+linear][@FISHER]``.

    Attributes:
        name: the registered method (`pissa`, `fisher_svd`, ...).
        fisher: "empirical" (no suffix) or "true" (``@true``).
        sketch_rank: K of a ``+sketchK`` suffix (sketched statistics), else None.
        linear_view: ``+linear``: targeted 1x1 convolutions are presented as ``nn.Linear``
            (:mod:`.pointwise`), so PEFT's linear-only initializers can run on them.
    """

    name: str
    fisher: str = "empirical"
    sketch_rank: int | None = None
    linear_view: bool = False


def parse_method(method: str) -> MethodName:
    """``"fisher_svd+sketch64@true"`` -> ``MethodName("fisher_svd", "true", 64, False)``.

    Raises:
        ValueError: for an unknown suffix or a malformed ``+sketchK``.
    """
    body, _, fisher = method.partition("@")
    name, *suffixes = body.split("+")
    sketch_rank = None
    linear_view = False
    for suffix in suffixes:
        if suffix == "linear":
            linear_view = True
        elif suffix.startswith("sketch"):
            digits = suffix[len("sketch"):]
            if not digits.isdigit() or int(digits) < 1:
                raise ValueError(f"method {method!r}: write the sketch rank as +sketchK, e.g. fisher_svd+sketch64")
            sketch_rank = int(digits)
        else:
            raise ValueError(f"method {method!r}: unknown suffix '+{suffix}' (known: +sketchK, +linear)")
    return MethodName(name, fisher or "empirical", sketch_rank, linear_view)


def split_method(method: str) -> tuple[str, str]:
    """`"fisher_svd@true"` -> `("fisher_svd", "true")`; no suffix means the empirical Fisher."""
    parsed = parse_method(method)
    return parsed.name, parsed.fisher


def sketch_rank_of(method: str) -> int | None:
    """`"fisher_svd+sketch64"` -> 64; None without a `+sketchK` part."""
    return parse_method(method).sketch_rank


def fisher_statistics_mb(model: nn.Module, method: str, fisher: FisherConfig) -> float | None:
    """MiB of the data statistics one of our methods holds (A and G, dense or sketched, and M for
    `fisher_grad`), from the model's layer shapes; None for a method that is not ours.

    The sketch comes from a `+sketchK` suffix, else from `fisher.sketch_threshold/sketch_rank`.
    """
    from ..peft import find_target_layers
    from ..stats.layers import weight_matrix
    from ..stats.sketch import layer_statistics_bytes

    name, _ = split_method(method)
    if name not in INITIALIZERS:
        return None
    initializer = INITIALIZERS[name]
    if not initializer.needs_statistics:
        return 0.0
    sketch = sketch_rank_of(method)
    threshold, rank = (sketch, sketch) if sketch is not None else (fisher.sketch_threshold, fisher.sketch_rank)
    total = 0
    for target in find_target_layers(model):
        d_out, d_in = (int(v) for v in weight_matrix(target.weight_module, target.layer_type).shape)
        total += layer_statistics_bytes(d_out, d_in, threshold, rank, initializer.needs_grad_mean)
    return total / 2**20


def known_methods() -> list[str]:
    """Every name `build_model` accepts (without @true/@empirical suffixes)."""
    return [*PEFT_BASELINES, *INITIALIZERS]


def build_model(method: str, base: nn.Module, spec: AdapterSpec, calibration: Sequence[Any],
                fisher_config: FisherConfig | None = None) -> nn.Module:
    """Wrap `base` in a PEFT LoRA model initialized by `method`.

    Args:
        method: a baseline (`lora`, `pissa`, ...) or one of ours, optionally `name@true`.
        base: a fresh base model (it is modified in place by residual-based methods).
        spec: rank, alpha, targets shared by every method.
        calibration: batches (`model(**batch)` with labels) seen by every data-aware method.
        fisher_config: settings for our methods (method and Fisher type are filled in here).

    Returns:
        the PEFT model, ready to train.
    """
    parsed = parse_method(method)
    name = parsed.name
    if parsed.fisher not in ("empirical", "true"):
        raise ValueError(f"method {method!r}: the suffix after '@' must be 'empirical' or 'true'")
    if name not in BUILDERS and name not in INITIALIZERS:
        raise ValueError(f"unknown method {method!r}; choose from {known_methods()}")
    if name in BUILDERS and ("@" in method or parsed.sketch_rank is not None):
        raise ValueError(f"method {method!r}: PEFT baselines take no Fisher type or sketch")
    if parsed.linear_view:
        spec = replace(spec, target_modules=pointwise_convs_as_linear_(base, spec.target_modules))
    if name in BUILDERS:
        return BUILDERS[name](base, spec, calibration, fisher_config or FisherConfig())
    config = replace(fisher_config or FisherConfig(), method=name, fisher=parsed.fisher)
    if parsed.sketch_rank is not None:
        config = replace(config, sketch_rank=parsed.sketch_rank, sketch_threshold=parsed.sketch_rank)
    return _build_ours(base, spec, calibration, config)


def _build_ours(base: nn.Module, spec: AdapterSpec, calibration: Sequence[Any], config: FisherConfig) -> nn.Module:
    from peft import get_peft_model

    model = get_peft_model(base, spec.lora_config())
    needs_data = INITIALIZERS[config.method].needs_statistics
    initialize_lora_fisher(model, list(calibration) if needs_data else None, config)
    return model


def _plain(init: Any) -> Builder:
    def build(base: nn.Module, spec: AdapterSpec, calibration: Sequence[Any], config: FisherConfig) -> nn.Module:
        from peft import get_peft_model

        return get_peft_model(base, spec.lora_config(init_lora_weights=init))

    return build


register_builder("lora")(_plain(True))
register_builder("gaussian")(_plain("gaussian"))
register_builder("pissa")(_plain("pissa"))
register_builder("olora")(_plain("olora"))


@register_builder("eva")
def build_eva(base: nn.Module, spec: AdapterSpec, calibration: Sequence[Any], config: FisherConfig) -> nn.Module:
    from peft import EvaConfig, get_peft_model, initialize_lora_eva_weights

    # rho = 1: no rank redistribution, so EVA gets the same rank per layer as every other method.
    eva_config = EvaConfig(rho=1.0, use_label_mask=spec.causal_lm)
    model = get_peft_model(base, spec.lora_config(init_lora_weights="eva", eva_config=eva_config),
                           low_cpu_mem_usage=True)
    batches = list(calibration)
    token_inputs = bool(batches) and isinstance(batches[0], dict) and "input_ids" in batches[0]
    # PEFT's defaults mask layer inputs by the batch's attention_mask/input_ids; image batches
    # have neither, so every row of the (rows, features) layer input is used instead.
    extra: dict[str, Any] = {} if token_inputs else {"prepare_model_inputs_fn": None,
                                                     "prepare_layer_inputs_fn": _all_rows}
    initialize_lora_eva_weights(model, dataloader=batches, show_progress_bar=config.progress, **extra)
    return model


def _all_rows(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    """EVA layer-input hook for inputs without tokens: ``(..., d)`` -> ``(rows, d)``."""
    if isinstance(layer_input, (tuple, list)):
        layer_input = layer_input[0]
    return layer_input.reshape(-1, layer_input.shape[-1])


@register_builder("corda")
def build_corda(base: nn.Module, spec: AdapterSpec, calibration: Sequence[Any], config: FisherConfig) -> nn.Module:
    from peft import get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    lora_config = spec.lora_config(init_lora_weights="corda", corda_config=CordaConfig(corda_method="ipm"))
    batches = list(calibration)

    @torch.no_grad()
    def run_model() -> None:
        # PEFT's CorDA hook squeezes dimension 0: it expects one example per forward pass.
        for batch in batches:
            for example in _single_examples(_without_labels(batch)):
                base(**example)

    preprocess_corda(base, lora_config, run_model=run_model)
    return get_peft_model(base, lora_config)


@register_builder("lora_ga")
def build_lora_ga(base: nn.Module, spec: AdapterSpec, calibration: Sequence[Any], config: FisherConfig) -> nn.Module:
    from peft import get_peft_model
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    lora_config = spec.lora_config(init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())
    batches = list(calibration)

    def train_step() -> None:
        for batch in batches:
            base(**batch).loss.backward()

    was_training = base.training
    base.eval()  # same as our statistics: no dropout noise in the calibration gradients
    preprocess_loraga(base, lora_config, train_step)
    base.train(was_training)
    return get_peft_model(base, lora_config)


def _single_examples(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Split a batch into one-example batches, right padding removed (by `attention_mask`)."""
    size = next(iter(batch.values())).shape[0]
    mask = batch.get("attention_mask")
    examples = []
    for index in range(size):
        length = int(mask[index].sum()) if mask is not None else None
        example = {}
        for key, value in batch.items():
            row = value[index:index + 1]
            if length is not None and row.dim() >= 2 and row.shape[1] == mask.shape[1]:  # type: ignore[union-attr]
                row = row[:, :length]
            example[key] = row
        examples.append(example)
    return examples


def _without_labels(batch: Any) -> Any:
    if isinstance(batch, dict):
        return {key: value for key, value in batch.items() if key != "labels"}
    return batch
