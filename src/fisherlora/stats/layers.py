"""How each supported layer type maps its input and output onto per-token rows of `x_t` and `g_t`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as functional
from torch import nn

from .errors import StatisticsError


@dataclass
class TargetLayer:
    """One layer to collect statistics for.

    Attributes:
        name: module name in the base model (no PEFT prefix).
        hook_module: the module whose forward input `x` and output `y` are recorded (a PEFT LoRA
            wrapper, whose output gradient equals the base layer's, or the layer itself).
        weight_module: the module holding `weight` (the base layer).
        layer_type: "linear", "conv1d" or "conv2d".
    """

    name: str
    hook_module: nn.Module
    weight_module: nn.Module
    layer_type: str


def module_weight(module: nn.Module) -> torch.Tensor:
    """The module's `weight` parameter; `TypeError` if it has none."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"module of type {type(module).__name__} has no weight tensor")
    return weight


def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: a Linear whose weight is stored (d_in, d_out).
    # An empty weight (a ZeRO-3 partition) is still recognized, so that it is refused as partitioned.
    weight = module_weight(module)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and (weight.dim() == 2 or weight.numel() == 0)


def layer_type_of(name: str, module: nn.Module) -> str:
    """Return "linear", "conv1d" or "conv2d"; raise `TypeError` naming the module otherwise."""
    if isinstance(module, nn.Linear):
        return "linear"
    if _is_hf_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise TypeError(
                f"module {name!r} is an nn.Conv2d with groups={module.groups}; only groups == 1 is supported "
                "(depthwise/grouped convolutions are not LoRA targets)"
            )
        if module.padding_mode != "zeros":
            raise TypeError(f"module {name!r} is an nn.Conv2d with padding_mode={module.padding_mode!r}; only 'zeros'")
        return "conv2d"
    raise TypeError(
        f"module {name!r} has type {type(module).__name__}; fisherlora supports nn.Linear, transformers Conv1D "
        "and nn.Conv2d (groups == 1)"
    )


PARTITIONED_WEIGHTS_DOC = "docs/scaling.md, section 'Partitioned weights (ZeRO-3, FSDP)'"


def _declared_weight_shape(module: nn.Module, layer_type: str) -> tuple[int, ...] | None:
    """The weight shape the module's own attributes declare, where they do."""
    if layer_type == "linear" and hasattr(module, "in_features"):
        return (int(module.out_features), int(module.in_features))  # type: ignore[arg-type]
    if layer_type == "conv1d" and hasattr(module, "nx"):
        return (int(module.nx), int(module.nf))  # type: ignore[arg-type]
    if layer_type == "conv2d":
        assert isinstance(module, nn.Conv2d)
        return (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
    return None


def check_materialized(name: str, module: nn.Module, layer_type: str) -> None:
    """Raise `StatisticsError` naming the module if its weight is partitioned or not materialized.

    DeepSpeed ZeRO-3 and FSDP leave each rank an empty (or flat, partial) tensor outside their
    forward; a model built on the meta device has no values at all. Collection needs the weight's
    shape before the first batch and its values for the fingerprint.
    """
    weight = module_weight(module)
    declared = _declared_weight_shape(module, layer_type)
    expected_dims = 4 if layer_type == "conv2d" else 2
    if weight.is_meta:
        problem = "is on the meta device (not materialized)"
    elif weight.numel() == 0 or weight.dim() != expected_dims:
        problem = f"has shape {tuple(weight.shape)}: it is partitioned or not materialized"
    elif declared is not None and tuple(weight.shape) != declared:
        problem = f"has shape {tuple(weight.shape)} where the module declares {declared}: it is partitioned"
    else:
        return
    raise StatisticsError(
        f"the weight of module {name!r} {problem} (DeepSpeed ZeRO-3 and FSDP keep only a shard per rank); "
        f"gather the targeted weights first, see {PARTITIONED_WEIGHTS_DOC}"
    )


def weight_matrix(module: nn.Module, layer_type: str) -> torch.Tensor:
    """The layer's weight as the `(d_out, d_in)` matrix of `y = W x` (a view where possible)."""
    weight = module_weight(module)
    if layer_type == "conv1d":
        return weight.T
    if layer_type == "conv2d":
        return weight.reshape(weight.shape[0], -1)
    return weight


@dataclass
class TokenRows:
    """Rows of one recorded call.

    Attributes:
        inputs: `(N, d_in)` float32 input rows (patches for Conv2d).
        leading_shape: the batch/sequence shape the `N` rows were flattened from, e.g. `(B, S)`,
            `(B,)`, or `(B, L)` for the `L` output positions of a convolution.
    """

    inputs: torch.Tensor
    leading_shape: tuple[int, ...]
    selected: bool = False  # True: `inputs` holds only the kept rows (`kept_input_rows`)


def input_rows(module: nn.Module, layer_type: str, layer_input: torch.Tensor) -> TokenRows:
    """Flatten a layer's input into per-token rows `x_t` (a float32 copy).

    Linear/Conv1D: `(..., d_in)` -> `(N, d_in)`; Conv2d: `(B, C, H, W)` -> unfolded patches
    `(B * L, C * kh * kw)`, matching `weight.reshape(C_out, -1)` column order.
    """
    if layer_type == "conv2d":
        assert isinstance(module, nn.Conv2d)
        # detach: a conv input that is itself in the graph (any conv after the first) would
        # otherwise chain the float32 accumulators into autograd across batches (stats returned
        # with requires_grad=True and a graph growing with every batch).
        patches = functional.unfold(
            layer_input.detach().float(),
            kernel_size=module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,  # type: ignore[arg-type]
            stride=module.stride,
        )  # (B, C*kh*kw, L)
        batch, features, positions = patches.shape
        return TokenRows(patches.transpose(1, 2).reshape(-1, features), (batch, positions))
    leading = tuple(layer_input.shape[:-1])
    # A copy even for float32 input: the model may overwrite its input in place after the layer
    # has read it (`x += fc(x)`), before the rows are added to `A`.
    rows = layer_input.detach().to(torch.float32, copy=True)
    return TokenRows(rows.reshape(-1, layer_input.shape[-1]), leading)


def kept_input_rows(layer_input: torch.Tensor, kept_rows: torch.Tensor | None) -> TokenRows:
    """The float32 rows `x_t` `(K, d_in)` of a linear or Conv1D layer's input `(..., d_in)` at the
    kept row indices `kept_rows` `(K,)` int64 (None: every row), copied in one gather.

    The gather is the copy `input_rows` makes: a later in-place write to the input cannot reach it.
    """
    flat = layer_input.detach().reshape(-1, layer_input.shape[-1])
    if kept_rows is None:
        rows = flat.to(torch.float32, copy=True)
    else:  # index_select returns a new tensor; a narrower dtype is converted after the gather (fewer bytes)
        rows = flat.index_select(0, kept_rows).float()
    return TokenRows(rows, tuple(layer_input.shape[:-1]), selected=True)


def output_gradient_rows(layer_type: str, output_gradient: torch.Tensor) -> torch.Tensor:
    """Flatten `dL/dy` into per-token rows `g_t` (float32), aligned with `input_rows`.

    Linear/Conv1D: `(..., d_out)` -> `(N, d_out)`; Conv2d: `(B, C_out, Ho, Wo)` -> `(B * L, C_out)`.
    """
    if layer_type == "conv2d":
        batch, channels = output_gradient.shape[:2]
        return output_gradient.float().reshape(batch, channels, -1).transpose(1, 2).reshape(-1, channels)
    return output_gradient.float().reshape(-1, output_gradient.shape[-1])
