"""The `+linear` view: 1x1 convolutions rewritten as nn.Linear compute the same function, and
PEFT's linear-only initializers then run on them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fisherlora.bench.baselines import AdapterSpec, build_model, parse_method
from fisherlora.bench.pointwise import (
    PointwiseLinear,
    is_pointwise_conv,
    pointwise_conv_names,
    pointwise_convs_as_linear_,
)
from fisherlora.bench.roles import is_baseline, method_order
from fisherlora.bench.tasks import ImageClassifier, plain_pointwise_convs_
from fisherlora.config import FisherConfig

TARGETS = ["backbone.2", "backbone.4"]


def tiny_image_classifier(seed: int = 0) -> ImageClassifier:
    """3x3 stem conv, two pointwise convs (the LoRA targets), pooled features, 3 classes."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 1), nn.ReLU(),
                             nn.Conv2d(6, 5, 1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return ImageClassifier(backbone, 5, 3).eval()


def pixel_batches(count: int = 2, batch_size: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(batch_size, 3, 5, 5, generator=generator),
             "labels": torch.randint(0, 3, (batch_size,), generator=generator)} for _ in range(count)]


def test_pointwise_linear_computes_the_convolution():
    conv = nn.Conv2d(4, 6, 1).double()
    pixels = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    state = torch.random.get_rng_state()
    linear_view = PointwiseLinear(conv)
    assert torch.equal(torch.random.get_rng_state(), state)  # the conversion draws no random numbers
    assert torch.allclose(linear_view(pixels), conv(pixels), atol=1e-12)
    with pytest.raises(ValueError, match="1x1, stride-1"):
        PointwiseLinear(nn.Conv2d(4, 6, 3))


class NoPadding(nn.Module):
    """EfficientNet's own identity module (not an ``nn.Identity``)."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels


class StaticPaddingConv(nn.Conv2d):
    """EfficientNet's "same"-padding conv: pads its input with a fixed module, then convolves."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, pad: int = 0) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride)
        self.static_padding = nn.ZeroPad2d(pad) if pad else NoPadding()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return super().forward(self.static_padding(pixels))


def test_one_pointwise_predicate_for_targets_swap_and_linear_view():
    torch.manual_seed(0)
    backbone = nn.Sequential(
        StaticPaddingConv(3, 4, 1),  # 0: pointwise, a subclass PEFT cannot rebuild -> swapped
        StaticPaddingConv(4, 4, 1, pad=1),  # 1: pads its input first -> not pointwise
        nn.Conv2d(4, 4, 1, stride=2),  # 2: strided -> not pointwise
        nn.Conv2d(4, 4, 1, groups=2),  # 3: grouped -> not pointwise
        nn.Conv2d(4, 4, 1, padding=1),  # 4: padded -> not pointwise
        nn.Conv2d(4, 5, 1),  # 5: pointwise
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    expected = ["0", "5"]
    assert [name for name, module in backbone.named_children() if is_pointwise_conv(module)] == expected
    assert pointwise_conv_names(backbone) == expected
    pixels = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        reference = backbone(pixels)
    assert plain_pointwise_convs_(backbone) == 1
    assert type(backbone[0]) is nn.Conv2d and type(backbone[1]) is StaticPaddingConv
    assert pointwise_conv_names(backbone) == expected
    with torch.no_grad():
        torch.testing.assert_close(backbone(pixels), reference)
    assert pointwise_convs_as_linear_(backbone, ["0", "1", "5"]) == ["0.linear", "5.linear", "1"]
    with torch.no_grad():
        torch.testing.assert_close(backbone(pixels), reference)


def test_targets_are_renamed_and_bad_targets_refused():
    model = tiny_image_classifier()
    assert pointwise_convs_as_linear_(model, TARGETS) == ["backbone.2.linear", "backbone.4.linear"]
    assert isinstance(model.backbone[2], PointwiseLinear)
    with pytest.raises(ValueError, match="no 1x1 nn.Conv2d"):
        pointwise_convs_as_linear_(tiny_image_classifier(), ["backbone.0"])
    with pytest.raises(ValueError, match="regex"):
        pointwise_convs_as_linear_(tiny_image_classifier(), r".*\.2")


@pytest.mark.parametrize("method", ["pissa", "olora", "eva", "corda", "lora_ga", "lora", "fisher_select"])
def test_linear_view_methods_keep_the_base_function(method: str):
    base = tiny_image_classifier()
    batches = pixel_batches()
    with torch.no_grad():
        reference = base(pixel_values=batches[0]["pixel_values"]).logits
    spec = AdapterSpec(rank=2, alpha=4, target_modules=TARGETS, modules_to_save=["classifier"])
    model = build_model(f"{method}+linear", copy.deepcopy(base), spec, batches, FisherConfig(progress=False))
    model.eval()
    with torch.no_grad():
        after = model(pixel_values=batches[0]["pixel_values"]).logits
    assert (after - reference).abs().max() <= 1e-5
    lora_names = [name for name, _ in model.named_parameters() if "lora_A" in name]
    assert len(lora_names) == 2 and all(".linear.lora_A" in name for name in lora_names)


def test_fisher_init_is_the_same_on_both_views():
    batches = pixel_batches()
    spec = AdapterSpec(rank=2, alpha=4, target_modules=TARGETS, modules_to_save=["classifier"])
    config = FisherConfig(progress=False)
    conv_model = build_model("fisher_svd", tiny_image_classifier().double(), spec,
                             [{k: v.double() if v.is_floating_point() else v for k, v in b.items()} for b in batches],
                             config)
    linear_model = build_model("fisher_svd+linear", tiny_image_classifier().double(), spec,
                               [{k: v.double() if v.is_floating_point() else v for k, v in b.items()} for b in batches],
                               config)
    conv_state = conv_model.state_dict()
    linear_state = linear_model.state_dict()
    for layer in TARGETS:
        for part in ("lora_A.default.weight", "lora_B.default.weight", "base_layer.weight"):
            conv_tensor = conv_state[f"base_model.model.{layer}.{part}"]
            linear_tensor = linear_state[f"base_model.model.{layer}.linear.{part}"]
            assert torch.allclose(conv_tensor.reshape(linear_tensor.shape), linear_tensor, atol=1e-10)


def test_method_names_with_the_linear_view():
    assert parse_method("pissa+linear").linear_view and parse_method("pissa+linear").name == "pissa"
    assert parse_method("fisher_svd+sketch8+linear@true") == parse_method("fisher_svd+linear+sketch8@true")
    with pytest.raises(ValueError, match=r"unknown suffix '\+flat'"):
        parse_method("pissa+flat")
    assert is_baseline("eva+linear") and not is_baseline("fisher_svd+linear")
    assert method_order(["fisher_svd", "pissa+linear", "lora", "pissa"]) == ["lora", "pissa", "pissa+linear",
                                                                          "fisher_svd"]
