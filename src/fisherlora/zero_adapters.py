"""While statistics are collected, a LoRA layer whose adapters all add nothing runs as its base layer.

An adapter with `lora_B = 0` (weight and bias: PEFT's default start, and the state initialization
requires) contributes `s B A x = 0`: the layer's output, and so the gradient at it, are the base
layer's. Skipping the adapter's two small products, its scaling and its sum, forward and backward,
makes the collection's passes the model's own, as LoRA-GA's are (it runs before the adapter exists).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .base_weight_guards import adapter_at_zero
from .stats.layers import TargetLayer


def _adds_nothing(layer: Any) -> bool:
    """A plain (unmerged, not disabled) LoRA layer whose every active adapter is vanilla LoRA at zero."""
    if not hasattr(layer, "lora_A") or getattr(layer, "merged", True) or getattr(layer, "disable_adapters", True):
        return False
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    return all(name not in getattr(layer, "lora_variant", {}) and adapter_at_zero(layer, name) for name in active)


@contextmanager
def zero_adapters_bypassed(targets: Sequence[TargetLayer]) -> Iterator[None]:
    """Run each target's LoRA wrapper as its base layer while the block runs, where that changes
    nothing (`_adds_nothing`); restored on every exit path."""
    bypassed: list[Any] = [target.hook_module for target in targets if _adds_nothing(target.hook_module)]
    try:
        for layer in bypassed:
            layer._disable_adapters = True  # the flag alone: enable_adapters() would also set requires_grad
        yield
    finally:
        for layer in bypassed:
            layer._disable_adapters = False
