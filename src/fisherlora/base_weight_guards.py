"""What must hold before a residual `W - s B A` is written into a base weight, and the one repair.

A residual-based initializer keeps the model's function only if the base weight it rewrites is
used by the adapter being initialized alone. Three ways a PEFT model breaks that, seen in public
PEFT bug reports: another adapter on the same layer reads the same base weight; the adapter being
initialized already holds a non-zero `s B A` that the new factors would discard; the weight is
*tied* (shares storage) with another parameter, typically the input embedding of a causal LM
with `tie_word_embeddings=True`. The first two are refused; a tied weight is given its own copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .stats.layers import TargetLayer, module_weight


def _materialized(tensor: torch.Tensor) -> bool:
    return tensor.numel() > 0 and tensor.device.type != "meta"


def _is_zero(tensor: torch.Tensor | None) -> bool:
    return tensor is None or not _materialized(tensor) or not bool(tensor.detach().any())


def adapter_at_zero(layer: Any, adapter_name: str) -> bool:
    """Whether the LoRA layer's `lora_B` of `adapter_name` (weight and bias) is zero: then the
    adapter adds nothing, `s (B A x + b) = 0`."""
    lora_b = layer.lora_B[adapter_name]
    return _is_zero(lora_b.weight) and _is_zero(getattr(lora_b, "bias", None))


def check_adapter_is_alone_and_at_zero(targets: Sequence[TargetLayer], adapter_name: str) -> None:
    """Refuse to initialize `adapter_name` where that would change outputs other than its own.

    Raises:
        ValueError: naming the first module that also holds another adapter (the residual would
            change that adapter's outputs: PEFT only warns for PiSSA/OLoRA/CorDA, we refuse), or
            whose adapter `adapter_name` is not at zero (`lora_B` weight or bias non-zero: created
            with `init_lora_weights="pissa"`/`"olora"`/`False`, loaded trained, or already
            initialized), whose `s B A` the new factors would discard.
    """
    for target in targets:
        layer: Any = target.hook_module
        others = sorted({*layer.lora_A, *getattr(layer, "lora_embedding_A", {})} - {adapter_name})
        if others:
            raise ValueError(
                f"module {target.name!r} also holds adapter(s) {others}: initializing {adapter_name!r} writes the "
                "residual W - s B A into the base weight they share, which would change their outputs. Initialize "
                f"{adapter_name!r} on a model without them, convert it with fisherlora.save_as_lora, and load the "
                "converted adapter next to the others on the original base (or merge them first: merge_and_unload)"
            )
        if not adapter_at_zero(layer, adapter_name):
            raise ValueError(
                f"module {target.name!r}: adapter {adapter_name!r} is not at zero (its lora_B is non-zero: created "
                "with init_lora_weights='pissa', 'olora', False, ..., loaded from a trained adapter, or already "
                "initialized by fisherlora); initializing would discard its s B A and change the model's outputs. "
                "Create the adapter with PEFT's default init_lora_weights=True on the original base model"
            )


def shared_weight_names(model: nn.Module, targets: Sequence[TargetLayer]) -> dict[str, list[str]]:
    """Tied weights: target name -> names (as `model.named_modules` spells them) of the parameters
    of *other* modules that share storage with the target's weight. Targets without any are left out.

    Storage, not parameter identity, is compared, so views of one tensor count as tied too. A module
    used at several places (the same object) is not a tie: its adapter applies at every use.
    """
    holders: dict[tuple[torch.device, int], list[tuple[nn.Module, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for parameter_name, parameter in module.named_parameters(recurse=False):
            if _materialized(parameter):
                key = (parameter.device, parameter.untyped_storage().data_ptr())
                holders.setdefault(key, []).append((module, f"{module_name}.{parameter_name}"))
    shared = {}
    for target in targets:
        weight = module_weight(target.weight_module)
        if not _materialized(weight):
            continue
        names = sorted({name for module, name in holders.get((weight.device, weight.untyped_storage().data_ptr()), [])
                        if module is not target.weight_module})
        if names:
            shared[target.name] = names
    return shared


def untie_weight(model: nn.Module, module: nn.Module) -> None:
    """Give `module` its own copy of its (tied) weight, in place; the other holders keep theirs.

    When the weight was tied as a transformers model's output embedding, that model's
    `config.tie_word_embeddings` is set to False, so that `save_pretrained`/`from_pretrained` keep
    the two matrices apart instead of tying them again.
    """
    weight = module_weight(module)
    for candidate in model.modules():
        config: Any = getattr(candidate, "config", None)
        output_embeddings = getattr(candidate, "get_output_embeddings", None)
        if getattr(config, "tie_word_embeddings", False) and callable(output_embeddings):
            if getattr(output_embeddings(), "weight", None) is weight:
                config.tie_word_embeddings = False
    module.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
