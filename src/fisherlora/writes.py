"""Writing adapters into a model layer by layer, undoably: all or nothing in one layer's memory.

Initialization computes every layer's factors first (small: `r (d_out + d_in)` numbers each), then
writes layer by layer: the adapter's `A` and `B`, an untied copy of a tied weight, and the residual
`W - s B A` formed only for the layer being written. If a later layer fails (out of memory, an
interrupt), `WriteLog.rollback` restores every layer already written, exactly: the original weight
is rebuilt from the residual in place and the factors (`round(W_res + s B A)`), and the few entries
where that rounding does not give `W` back bit for bit are kept aside when the layer is written.
So no second copy of the model's weights is ever held.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .base_weight_guards import untie_weight
from .phases import phase
from .stats.layers import module_weight, weight_matrix


def _to_weight_layout(weight: torch.Tensor, layer_type: str, matrix: torch.Tensor) -> torch.Tensor:
    """A `(d_out, d_in)` matrix in the layout of `weight` (transposed for Conv1D, reshaped for Conv2d)."""
    return matrix.T if layer_type == "conv1d" else matrix.reshape(weight.shape)


@dataclass
class WriteLog:
    """What has been written so far, and how to undo it (newest last)."""

    undo: list[Callable[[], None]] = field(default_factory=list)

    def copy_into(self, parameter: torch.Tensor, value: torch.Tensor) -> None:
        """`parameter.copy_(value)` (cast to its dtype and device), undoably (keeps the old values:
        meant for small tensors such as the adapter's `A` and `B`)."""
        before = parameter.detach().clone()
        with torch.no_grad():
            parameter.copy_(value.to(dtype=parameter.dtype, device=parameter.device))

        def restore() -> None:
            with torch.no_grad():
                parameter.copy_(before)

        self.undo.append(restore)

    def keep_adapter(self, layer: Any, adapter_name: str) -> None:
        """Undoably keep the LoRA layer's entries of `adapter_name` (its `lora_A`/`lora_B` modules, `r`,
        `lora_alpha`, `scaling`, dropout) before the adapter is re-created at another rank."""
        names = [*layer.adapter_layer_names, *layer.other_param_names]
        kept = {name: getattr(layer, name)[adapter_name] for name in names if adapter_name in getattr(layer, name)}

        def restore() -> None:
            for name, value in kept.items():
                getattr(layer, name)[adapter_name] = value

        self.undo.append(restore)

    def untie(self, model: nn.Module, module: nn.Module) -> None:
        """`base_weight_guards.untie_weight`, undoably: the module gets back the shared parameter
        (which the untied copy never changed) and the configs their `tie_word_embeddings`."""
        parameter = module.weight
        configs: list[tuple[Any, bool]] = []
        for candidate in model.modules():
            config: Any = getattr(candidate, "config", None)
            if hasattr(config, "tie_word_embeddings"):
                configs.append((config, config.tie_word_embeddings))
        untie_weight(model, module)

        def restore() -> None:
            module.weight = parameter
            for config, value in configs:
                config.tie_word_embeddings = value

        self.undo.append(restore)

    def write_residual(self, module: nn.Module, layer_type: str, product: Callable[[], torch.Tensor]) -> float:
        """Replace the module's weight `W` by `W - P` (rounded to the weight's dtype), undoably.

        Args:
            module: the layer holding `weight`.
            layer_type: "linear", "conv1d" or "conv2d" (see `stats.layers.weight_matrix`).
            product: returns `P = s B A` `(d_out, d_in)` float64; called again (same result) to undo.

        Returns:
            the rounding of the residual, `||round(W - P) + P - W||_F / ||W||_F` (0 for a zero `W`): how
            far the layer's function at step 0 is from the original one's (less the adapter factors'
            own rounding): about 1e-7 in float32, about 2e-3 in bfloat16.
        """
        weight = module_weight(module)
        matrix = weight_matrix(module, layer_type).detach()
        adapter = product()
        # Out of place until `rebuilt` is used: for a float64 weight, .double() and .to() return the
        # tensor itself (`original` is the weight's own storage, `rebuilt` is `unrounded`).
        original = matrix.double()
        residual = (original - adapter).to(weight.dtype)
        unrounded = residual.double() + adapter
        rebuilt = unrounded.to(weight.dtype)
        differs = (rebuilt != matrix).reshape(-1).nonzero().squeeze(1)  # where round(W_res + P) != W
        kept = matrix.reshape(-1)[differs].clone()
        del rebuilt, adapter
        scale = float(original.norm())
        rounding = float(unrounded.sub_(original).norm()) / scale if scale > 0 else 0.0  # `unrounded` is ours
        del original, unrounded
        with torch.no_grad():
            weight.copy_(_to_weight_layout(weight, layer_type, residual))
        del residual

        def restore() -> None:
            current = weight_matrix(module, layer_type).detach()
            original = (current.double() + product()).to(weight.dtype).contiguous()
            original.view(-1)[differs] = kept
            with torch.no_grad():
                weight.copy_(_to_weight_layout(weight, layer_type, original))

        self.undo.append(restore)
        return rounding

    def rollback(self) -> None:
        """Undo everything written, newest first."""
        while self.undo:
            self.undo.pop()()


@contextmanager
def all_or_nothing() -> Iterator[WriteLog]:
    """A `WriteLog` whose writes are rolled back if the block raises (the error is re-raised)."""
    log = WriteLog()
    try:
        with phase("write"):
            yield log
    except BaseException:
        log.rollback()
        raise
