"""Losses and masks for the Fisher: sum-reduced cross-entropy over the data's labels (empirical)
or over labels sampled from the model's own predictions (true), for classification and causal LM.

Pure functions on tensors; the collection steps in `strategy.py` call them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as functional

IGNORE_INDEX = -100

Batch = Any
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]
SampleFn = Callable[[torch.nn.Module, Batch, torch.Generator], Batch]


COLLATE_HINT = ("collate the examples into one batch of tensors (e.g. DataLoader(..., collate_fn="
                "transformers.DataCollatorWithPadding(tokenizer)), or tokenizer(..., return_tensors='pt'))")


def split_batch(batch: Batch) -> tuple[Callable[[torch.nn.Module], Any], torch.Tensor | None, torch.Tensor | None]:
    """Return `(forward, labels, attention_mask)` for a batch.

    A mapping is called as `model(**inputs)` without its `labels` (we compute the loss ourselves,
    sum-reduced); a `(inputs, labels)` pair is called as `model(inputs)`.

    Raises:
        TypeError: a batch of another form, naming it: a list of per-example dicts or a mapping whose
            values are Python lists (not collated into tensors), a pair whose labels are not a tensor.
    """
    if isinstance(batch, Mapping):
        lists = [key for key, value in batch.items() if isinstance(value, list)]
        if lists:
            raise TypeError(f"batch values {lists} are Python lists, not tensors: {COLLATE_HINT}")
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        labels = batch.get("labels")
        attention_mask = batch.get("attention_mask")
        for name, value in (("labels", labels), ("attention_mask", attention_mask)):
            if value is not None and not isinstance(value, torch.Tensor):
                raise TypeError(f"batch[{name!r}] is a {type(value).__name__}, not a tensor: {COLLATE_HINT}")
        return (lambda model: model(**inputs)), labels, attention_mask
    if isinstance(batch, (tuple, list)) and batch and all(isinstance(item, Mapping) for item in batch):
        raise TypeError(f"a batch is a {type(batch).__name__} of {len(batch)} per-example mappings: {COLLATE_HINT}")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, labels = batch
        if labels is not None and not isinstance(labels, torch.Tensor):
            raise TypeError(f"an (inputs, labels) batch needs labels as a tensor, got a {type(labels).__name__}: "
                            f"{COLLATE_HINT}")
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


@dataclass
class LossTerms:
    """Which examples and positions of a batch carry a term of the loss.

    Attributes:
        examples: `(B,)` bool, examples with at least one term.
        tokens: `(B, S)` bool positions with a term, or None when the layout has no positions.
        targets: the cross-entropy targets, `(B,)` or `(B, S)` long, `IGNORE_INDEX` wherever there is
            no term, or None when the loss is not the default cross-entropy.
    """

    examples: torch.Tensor
    tokens: torch.Tensor | None = None
    targets: torch.Tensor | None = None

    @property
    def count(self) -> int:
        """`E`: the examples with a term."""
        return int(self.examples.sum())

    def rows(self, leading_shape: tuple[int, ...]) -> torch.Tensor | None:
        """The bool mask of the kept rows among `prod(leading_shape)` rows, or None to keep all.

        Rows shaped like the batch's positions take the token mask; other rows with a batch
        dimension first (pooled `(B, d)` inputs, convolution positions `(B, L)`) take the examples'.
        """
        if self.tokens is not None and leading_shape == tuple(self.tokens.shape):
            return self.tokens.reshape(-1)
        batch_size = self.examples.shape[0]
        if leading_shape and leading_shape[0] == batch_size and not bool(self.examples.all()):
            view = self.examples.reshape(batch_size, *[1] * (len(leading_shape) - 1))
            return view.expand(leading_shape).reshape(-1)
        return None


def _attended(attention_mask: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    if attention_mask is not None and tuple(attention_mask.shape) == shape:
        return attention_mask.to(device).bool()
    return torch.ones(shape, dtype=torch.bool, device=device)


def sequence_terms(labels: torch.Tensor | None, batch_size: int, attention_mask: torch.Tensor | None,
                   device: torch.device) -> LossTerms:
    """One term per example whose label is not -100 (every example when there are no labels, whose
    targets the true Fisher draws); its attended tokens are kept. Float labels (regression,
    multi-label) have no ignored value and no cross-entropy targets.

    Args:
        labels: `(B,)` integer class labels, float labels of any shape, or None.
    """
    if labels is None or labels.is_floating_point():
        examples = torch.ones(batch_size, dtype=torch.bool, device=device)
    else:
        examples = labels.to(device) != IGNORE_INDEX
    tokens = None
    if attention_mask is not None and attention_mask.dim() == 2:
        tokens = attention_mask.to(device).bool() & examples[:, None]
    targets = None
    if labels is None:
        targets = torch.zeros(batch_size, dtype=torch.long, device=device)
    elif not labels.is_floating_point():
        targets = labels.to(device).long()
    return LossTerms(examples, tokens, targets)


def position_terms(targets: torch.Tensor, attention_mask: torch.Tensor | None) -> LossTerms:
    """One term per attended position whose target is not -100; the targets are set to -100
    wherever there is no term, so that the loss has exactly the kept terms.

    Args:
        targets: `(B, S)` long, already shifted for a causal LM.
    """
    tokens = _attended(attention_mask, tuple(targets.shape), targets.device) & (targets != IGNORE_INDEX)
    targets = torch.where(tokens, targets, torch.full_like(targets, IGNORE_INDEX))
    return LossTerms(tokens.any(dim=1), tokens, targets.long())


def batch_terms(layout: str, labels: torch.Tensor | None, input_ids: torch.Tensor | None,
                attention_mask: torch.Tensor | None, batch_size: int) -> LossTerms:
    """The loss terms of a batch for a label layout ("sequence", "token" or "causal", see `heads.py`).

    Without labels (true Fisher): a sequence example and an attended token each carry a term, and
    a causal LM predicts its `input_ids`.
    """
    if layout == "sequence":
        device = next((t.device for t in (labels, input_ids, attention_mask) if t is not None), torch.device("cpu"))
        return sequence_terms(labels, batch_size, attention_mask, device)
    if layout == "causal":
        return position_terms(causal_targets(labels, input_ids, attention_mask), attention_mask)
    if labels is None:
        if attention_mask is None:
            raise ValueError("a token-level batch without labels needs an attention_mask to know its positions")
        labels = torch.zeros_like(attention_mask, dtype=torch.long)
    return position_terms(labels, attention_mask)


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


def default_loss_units(batch: Batch, layout: str | None = None) -> int:
    """Units a mean-reduced loss averages over, as transformers' losses count them.

    2-D labels of a causal LM (or of a module without a declared head, `layout=None`): labels
    != -100 after the shift. Other integer labels: labels != -100 (ignored examples and positions
    are not averaged over). Float labels (regression, multi-label): every element.
    """
    labels = None
    if isinstance(batch, Mapping):
        labels = batch.get("labels")
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        labels = batch[1]
    if isinstance(labels, torch.Tensor):
        if labels.dim() >= 2 and layout in (None, "causal"):
            return int((labels[:, 1:] != IGNORE_INDEX).sum())
        if not labels.is_floating_point():
            return int((labels != IGNORE_INDEX).sum())
        return int(labels.numel())
    raise ValueError("cannot infer the number of loss units of a mean-reduced loss: the batch has no `labels`")
