"""The forward+backward floor of a data-aware initialization: one forward and one backward pass per
calibration batch, and nothing else.

Every method that reads gradients (the Fisher statistics, LoRA-GA) needs at least this; the backward
computes the activation gradients through every layer and no weight gradient (the parameters do not
require one; the gradient is taken at the input embeddings' output, or at the floating-point inputs
of a model without input embeddings, such as an image model).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..phases import phase


def _leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().requires_grad_(True)


def forward_backward_floor(model: nn.Module, batches: Sequence[dict[str, Any]]) -> None:
    """Run `model(**batch).loss` and its backward for every batch, in eval mode, no weight gradient.

    Args:
        model: a model whose `model(**batch)` returns an output with `.loss` (the batches hold labels).
        batches: the calibration batches.

    Raises:
        ValueError: a batch gives no loss.
    """
    was_training = model.training
    flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
    leaves: list[torch.Tensor] = []

    def embedding_leaf(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        leaf = _leaf(output)
        leaves.append(leaf)
        return leaf

    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    handle = embeddings.register_forward_hook(embedding_leaf) if isinstance(embeddings, nn.Module) else None
    try:
        model.eval()
        for parameter in flags:
            parameter.requires_grad_(False)
        for index, batch in enumerate(batches):
            leaves.clear()
            if handle is None:  # no embeddings: the gradient is taken at the floating-point inputs
                batch = {key: _leaf(value) if torch.is_tensor(value) and value.is_floating_point() else value
                         for key, value in batch.items()}
                leaves.extend(value for value in batch.values() if torch.is_tensor(value) and value.requires_grad)
            with phase("forward"):
                loss = getattr(model(**batch), "loss", None)
            if loss is None or not leaves:
                raise ValueError(f"batch {index}: the model returned no loss, or no input takes a gradient")
            with phase("backward"):
                torch.autograd.grad(loss, leaves)
    finally:
        if handle is not None:
            handle.remove()
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
        model.train(was_training)
