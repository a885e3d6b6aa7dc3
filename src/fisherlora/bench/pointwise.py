"""Pointwise (1x1) convolutions presented to PEFT as `nn.Linear` layers.

PEFT implements PiSSA, OLoRA, EVA, CorDA and LoRA-GA for linear layers only, so on a network
whose LoRA targets are 1x1 convolutions (the vision task) they fail. A 1x1, stride-1, unpadded,
ungrouped convolution is a linear map applied to every pixel's channel vector, so it can be
rewritten as an `nn.Linear` over the ``(B * H * W, C)`` rows without changing the function.
The benchmark method suffix ``+linear`` (e.g. ``pissa+linear``) applies a method to that view.
"""

from __future__ import annotations

import torch
from torch import nn

INNER_NAME = "linear"


class PointwiseLinear(nn.Module):
    """A 1x1 convolution computed by an inner ``nn.Linear`` named ``linear``.

    ``forward(x (B, C_in, H, W)) -> (B, C_out, H, W)``; the inner layer sees ``(B * H * W, C_in)``
    rows, the form PEFT's data-aware initializers expect (one row per token).
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not is_pointwise_conv(conv):
            raise ValueError(f"PointwiseLinear needs a 1x1, stride-1, unpadded, ungrouped nn.Conv2d, got {conv}")
        weight = conv.weight.detach()
        # Built on the meta device and filled from the conv, so the conversion draws no random
        # numbers: a converted model's later seeded initializations match an unconverted one's.
        linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None, device="meta",
                           dtype=weight.dtype)
        linear.weight = nn.Parameter(weight.reshape(conv.out_channels, conv.in_channels).clone(),
                                     requires_grad=conv.weight.requires_grad)
        if conv.bias is not None:
            linear.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=conv.bias.requires_grad)
        self.linear = linear

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = pixels.shape
        rows = pixels.permute(0, 2, 3, 1).reshape(-1, channels)
        out = self.linear(rows)
        return out.reshape(batch, height, width, -1).permute(0, 3, 1, 2).contiguous()


def is_pointwise_conv(module: nn.Module) -> bool:
    """True for an ``nn.Conv2d`` (or subclass) that is a per-pixel linear map: 1x1 kernel, stride 1,
    no padding, ``groups == 1``.

    The one definition of "pointwise conv" in the project: the vision task's LoRA targets, the
    swap of EfficientNet's conv subclasses for plain ``nn.Conv2d`` and the ``+linear`` view all use
    it. A subclass that pads its input itself (EfficientNet's static "same" padding keeps an
    ``nn.ZeroPad2d`` as ``static_padding`` then) is not pointwise.
    """
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and tuple(module.stride) == (1, 1)
        and module.groups == 1
        and module.padding in ((0, 0), "valid")
        and module.padding_mode == "zeros"
        and not isinstance(getattr(module, "static_padding", None), nn.ZeroPad2d)
    )


def pointwise_conv_names(model: nn.Module) -> list[str]:
    """Full names of ``model``'s pointwise convolutions (:func:`is_pointwise_conv`), in module order."""
    return [name for name, module in model.named_modules() if is_pointwise_conv(module)]


def pointwise_convs_as_linear_(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Replace every targeted pointwise conv of ``model`` by a :class:`PointwiseLinear`, in place.

    Args:
        model: the base model (before PEFT wraps it).
        target_modules: PEFT-style target names; a name matches a module whose full name equals
            it or ends with ``"." + name``. A regex string is refused (the new names could not
            be expressed in it).

    Returns:
        the target list to give PEFT: each converted conv's full name + ``".linear"``, plus the
        targets that matched no pointwise conv, unchanged.

    Raises:
        ValueError: if ``target_modules`` is a string or no target is a pointwise conv.
    """
    if isinstance(target_modules, str):
        raise ValueError(f"the '+linear' view needs target_modules as a list of names, got the regex "
                         f"{target_modules!r}")
    converted: list[str] = []
    matched_targets: set[str] = set()
    for name, module in list(model.named_modules()):
        matching = [t for t in target_modules if name == t or name.endswith("." + t)]
        if not matching or not is_pointwise_conv(module):
            continue
        mixed = [t for t in matching if any(other != name and (other == t or other.endswith("." + t))
                                            and not is_pointwise_conv(layer) and not isinstance(layer, PointwiseLinear)
                                            for other, layer in model.named_modules())]
        if mixed:
            raise ValueError(f"the '+linear' view: target {mixed[0]!r} matches both pointwise convs and other "
                             "layers; list the pointwise convs by name")
        assert isinstance(module, nn.Conv2d)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, PointwiseLinear(module))
        converted.append(f"{name}.{INNER_NAME}")
        matched_targets.update(matching)
    if not converted:
        raise ValueError(f"the '+linear' view found no 1x1 nn.Conv2d among the targets {target_modules}")
    return converted + [t for t in target_modules if t not in matched_targets]
