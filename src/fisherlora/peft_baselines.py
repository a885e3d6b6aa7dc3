"""PEFT's own initializers as catalogue entries: each builds a PEFT LoRA model with PEFT's code
(`init_lora_weights=...`, `initialize_lora_eva_weights`, `preprocess_corda`, `preprocess_loraga`),
so comparisons are against the anchors themselves, not re-implementations.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import FisherConfig
from .init.catalog import get_method, register_method
from .phases import phase


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


def build_lora_model(base: nn.Module, spec: AdapterSpec, calibration: Sequence[Any], config: FisherConfig) -> nn.Module:
    """Wrap `base` in a PEFT LoRA model initialized by the catalogue method `config.method`.

    PEFT's methods run their `build`; this project's wrap with `get_peft_model` and call
    `initialize_lora_fisher` on the calibration batches (only when the method reads statistics).

    Args:
        base: a fresh base model (residual-based methods modify its weights in place).
        spec: rank, alpha, targets shared by every method.
        calibration: batches (`model(**batch)` with labels) that every data-aware method sees.
        config: the method and its settings.

    Raises:
        ValueError: unknown method, or Fisher rank allocation asked of a method PEFT builds.
    """
    from peft import get_peft_model

    from .api import initialize_lora_fisher

    entry = get_method(config.method)
    needed = entry.statistics_needed(config)  # refuses Fisher rank allocation for PEFT's methods
    if entry.build is not None:
        return entry.build(base, spec, calibration, config)
    model = get_peft_model(base, spec.lora_config())
    initialize_lora_fisher(model, list(calibration) if needed else None, config)
    return model


def _plain(init: Any) -> Any:
    def build(base: nn.Module, spec: AdapterSpec, calibration: Sequence[Any], config: FisherConfig) -> nn.Module:
        from peft import get_peft_model

        return get_peft_model(base, spec.lora_config(init_lora_weights=init))

    return build


register_method("lora", "peft", "PEFT default: Kaiming-uniform A, zero B (init_lora_weights=True)",
                zero_start=True)(_plain(True))
register_method("gaussian", "peft", "PEFT: Gaussian A scaled by 1/r, zero B (init_lora_weights='gaussian')",
                zero_start=True)(_plain("gaussian"))
register_method("pissa", "peft", "PEFT PiSSA: top-r singular triplets of W, residual subtracted",
                linear_only=True)(_plain("pissa"))
register_method("olora", "peft", "PEFT OLoRA: QR decomposition of W, residual subtracted",
                linear_only=True)(_plain("olora"))


@register_method("eva", "peft", "PEFT EVA: SVD of layer inputs on the data, zero B (initialize_lora_eva_weights)",
                 zero_start=True, uses_data=True, linear_only=True)
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


@register_method("corda", "peft", "PEFT CorDA: context-oriented SVD with the input covariance (preprocess_corda)",
                 uses_data=True, linear_only=True)
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


_OUTPUTS_ONLY_HOOK = "Full backward hook is firing when gradients are computed with respect to module outputs"


@register_method("lora_ga", "peft", "PEFT LoRA-GA: SVD of the accumulated weight gradient (preprocess_loraga)",
                 uses_data=True, linear_only=True)
def build_lora_ga(base: nn.Module, spec: AdapterSpec, calibration: Sequence[Any], config: FisherConfig) -> nn.Module:
    from peft import get_peft_model
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    lora_config = spec.lora_config(init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())
    batches = list(calibration)

    def train_step() -> None:
        for batch in batches:
            with phase("forward"):
                loss = base(**batch).loss
            with phase("backward"), warnings.catch_warnings():
                # PEFT's LoRA-GA hooks read each target's weight gradient; with a frozen embedding the first
                # target's input needs no gradient, and torch warns that its full backward hook sees outputs only.
                warnings.filterwarnings("ignore", message=_OUTPUTS_ONLY_HOOK, category=UserWarning)
                loss.backward()

    was_training = base.training
    base.eval()  # same as our statistics: no dropout noise in the calibration gradients
    preprocess_loraga(base, lora_config, train_step)
    base.train(was_training)
    with phase("factorization"):  # get_peft_model runs LoRA-GA's per-layer SVDs
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
