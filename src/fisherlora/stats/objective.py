"""Losses and masks for the Fisher: sum-reduced cross-entropy over the data's labels (empirical)
or over labels sampled from the model's own predictions (true), for classification and causal LM.

Pure functions on tensors; the collection steps in `strategy.py` call them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as functional

IGNORE_INDEX = -100

Batch = Any
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]
SampleFn = Callable[[torch.nn.Module, Batch, torch.Generator], Batch]


def split_batch(batch: Batch) -> tuple[Callable[[torch.nn.Module], Any], torch.Tensor | None, torch.Tensor | None]:
    """Return `(forward, labels, attention_mask)` for a batch.

    A mapping is called as `model(**inputs)` without its `labels` (we compute the loss ourselves,
    sum-reduced); a `(inputs, labels)` pair is called as `model(inputs)`.
    """
    if isinstance(batch, Mapping):
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        labels = batch.get("labels")
        attention_mask = batch.get("attention_mask")
        return (lambda model: model(**inputs)), labels, attention_mask
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, labels = batch
        return (lambda model: model(inputs)), labels, None
    raise TypeError(
        f"a batch must be a mapping for model(**batch) or an (inputs, labels) pair, got {type(batch).__name__}; "
        "pass loss_fn= for other layouts"
    )


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits of a model output (an HF ModelOutput, a tuple, or a tensor)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TypeError(f"cannot find logits in a model output of type {type(outputs).__name__}; pass loss_fn=")


def causal_targets(labels: torch.Tensor | None, input_ids: torch.Tensor | None,
                   attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Next-token targets with the HF shift: position `t` predicts token `t + 1`.

    Returns `(B, S)` long targets where position `t` holds `labels[:, t+1]` (or `input_ids[:, t+1]`
    masked by the attention mask when there are no labels) and the last position is ignored.
    """
    source = labels if labels is not None else input_ids
    if source is None:
        raise ValueError("a causal-LM batch needs `labels` or `input_ids` to define next-token targets")
    source = source.clone()
    if labels is None and attention_mask is not None:
        source[attention_mask == 0] = IGNORE_INDEX
    targets = torch.full_like(source, IGNORE_INDEX)
    targets[:, :-1] = source[:, 1:]
    return targets


def token_mask(attention_mask: torch.Tensor | None, causal_target: torch.Tensor | None,
               shape: tuple[int, ...]) -> torch.Tensor:
    """`(B, S)` bool mask of the tokens kept in both factors: attended, and (causal LM) with a target."""
    mask = torch.ones(shape, dtype=torch.bool)
    if attention_mask is not None and tuple(attention_mask.shape) == shape:
        mask &= attention_mask.detach().cpu().bool()
    if causal_target is not None:
        mask &= causal_target.detach().cpu() != IGNORE_INDEX
    return mask


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over examples/positions of the cross-entropy; `targets == -100` contribute nothing.

    Args:
        logits: `(B, C)` or `(B, S, V)`.
        targets: `(B,)` or `(B, S)` long.
    """
    flat_logits = logits.float().reshape(-1, logits.shape[-1])
    return functional.cross_entropy(flat_logits, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def sample_targets(logits: torch.Tensor, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw labels from the model's predictive distribution where `like` is not ignored.

    Args:
        logits: `(B, C)` or `(B, S, V)`.
        like: targets of the same leading shape; positions equal to -100 stay -100.
    Returns:
        sampled long targets with the shape of `like`.
    """
    probabilities = torch.softmax(logits.detach().float().reshape(-1, logits.shape[-1]), dim=-1)
    draws = torch.multinomial(probabilities.cpu(), 1, generator=generator).reshape(like.shape).to(like.device)
    return torch.where(like == IGNORE_INDEX, like, draws)


def default_loss_units(batch: Batch) -> int:
    """Units a mean-reduced loss averages over: labels != -100 after the causal shift for 2-D
    labels, else examples."""
    labels = None
    if isinstance(batch, Mapping):
        labels = batch.get("labels")
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        labels = batch[1]
    if isinstance(labels, torch.Tensor):
        if labels.dim() >= 2:
            return int((labels[:, 1:] != IGNORE_INDEX).sum())
        return int(labels.shape[0])
    raise ValueError("cannot infer the number of loss units of a mean-reduced loss: the batch has no `labels`")
