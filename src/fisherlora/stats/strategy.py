"""The loss and the label draws of one collection, chosen once before the first batch.

Two steps: `DefaultLossStep` computes the sum-reduced cross-entropy from the model's logits itself
(classification `(B, C)` or causal-LM `(B, S, V)`); `CustomLossStep` calls the user's `loss_fn`. Each
takes the Fisher type as a draw policy: the empirical Fisher backpropagates the data's own labels
once, the true Fisher `n_samples` labels drawn from the model's predictive distribution (Martens &
Grosse 2015, "Optimizing Neural Networks with Kronecker-factored Approximate Curvature", sec. 5).
`choose_step` picks the step and the policy from the configuration; nothing in the per-batch code
asks which Fisher or which loss it computes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import FisherConfig
from .errors import StatisticsError
from .hooks import Recorder, Step
from .objective import (
    LossFn,
    SampleFn,
    causal_targets,
    default_loss_units,
    logits_of,
    sample_targets,
    split_batch,
    summed_cross_entropy,
    token_mask,
)


@dataclass(frozen=True)
class DataLabels:
    """Empirical Fisher: one backward pass with the data's labels."""

    draws: int = 1
    needs_labels: bool = True

    def draw(self, logits: torch.Tensor, targets: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return targets


@dataclass(frozen=True)
class SampledLabels:
    """True Fisher: `draws` backward passes, each with labels sampled from `softmax(logits)`."""

    draws: int
    needs_labels: bool = False

    def draw(self, logits: torch.Tensor, targets: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return sample_targets(logits, targets, generator)


@dataclass(frozen=True)
class DefaultLossStep:
    """`model(**inputs)` (or `model(inputs)`), then the summed cross-entropy of its logits."""

    labels: DataLabels | SampledLabels

    def __call__(self, model: nn.Module, batch: Any, recorder: Recorder, generator: torch.Generator,
                 batch_index: int) -> None:
        forward, labels, attention_mask = split_batch(batch)
        with recorder.recording():
            outputs = forward(model)
        logits = logits_of(outputs)
        targets, mask = self._targets(batch, logits, labels, attention_mask)
        examples = int(logits.shape[0])
        recorder.add_forward(mask, examples, batch_index)
        for draw in range(self.labels.draws):
            drawn = self.labels.draw(logits, targets, generator)
            recorder.backward(summed_cross_entropy(logits, drawn), examples, batch_index,
                              retain=draw < self.labels.draws - 1)

    def _targets(self, batch: Any, logits: torch.Tensor, labels: torch.Tensor | None,
                 attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(targets, (B, S) token mask or None)` for classification or causal-LM logits."""
        if logits.dim() == 2:
            if labels is None and self.labels.needs_labels:
                raise StatisticsError(
                    "the empirical Fisher needs `labels` in every batch; use fisher='true' for unlabeled data"
                )
            targets = labels if labels is not None else torch.zeros(logits.shape[0], dtype=torch.long,
                                                                     device=logits.device)
            if targets.dim() != 1 or targets.dtype not in (torch.int64, torch.int32):
                raise StatisticsError(
                    f"classification labels must be a 1-D integer tensor, got shape {tuple(targets.shape)} and "
                    f"dtype {targets.dtype}; pass loss_fn= for regression or multi-label models"
                )
            mask = token_mask(attention_mask, None, tuple(attention_mask.shape)) if attention_mask is not None else None
            return targets.long(), mask
        if logits.dim() == 3:
            input_ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
            targets = causal_targets(labels, input_ids, attention_mask)
            return targets, token_mask(attention_mask, targets, tuple(targets.shape))
        raise StatisticsError(f"logits of shape {tuple(logits.shape)} are neither (B, C) nor (B, S, V); pass loss_fn=")


@dataclass(frozen=True)
class DataBatch:
    """Empirical Fisher with a custom loss: the batch as it is, once."""

    draws: int = 1

    def draw(self, model: nn.Module, batch: Any, generator: torch.Generator) -> Any:
        return batch


@dataclass(frozen=True)
class SampledBatches:
    """True Fisher with a custom loss: `draws` batches whose labels `sample_fn` drew from the model."""

    sample_fn: SampleFn
    draws: int

    def draw(self, model: nn.Module, batch: Any, generator: torch.Generator) -> Any:
        with torch.no_grad():
            return self.sample_fn(model, batch, generator)


@dataclass(frozen=True)
class CustomLossStep:
    """`loss_fn(model, batch)` per draw; a mean-reduced loss is multiplied back by its loss units."""

    loss_fn: LossFn
    batches: DataBatch | SampledBatches
    mean_reduced: bool

    def __call__(self, model: nn.Module, batch: Any, recorder: Recorder, generator: torch.Generator,
                 batch_index: int) -> None:
        for draw in range(self.batches.draws):
            drawn_batch = self.batches.draw(model, batch, generator)
            with recorder.recording():
                loss = self.loss_fn(model, drawn_batch)
            if self.mean_reduced:
                # A mean over N loss units scales every g_t by 1/N; undo it so G does not depend on N.
                loss = loss * default_loss_units(drawn_batch)
            examples = _batch_size(drawn_batch)
            # Each draw repeats the forward: tokens count every time (A stays an average), the
            # examples only once.
            recorder.add_forward(_custom_mask(drawn_batch), examples if draw == 0 else 0, batch_index)
            recorder.backward(loss, examples, batch_index, retain=False)


def _custom_mask(batch: Any) -> torch.Tensor | None:
    """The attention mask, and for `labels` shaped like it the causal-LM targets, as a token mask."""
    attention_mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if attention_mask is None:
        return None
    labels = batch.get("labels")
    causal = labels if isinstance(labels, torch.Tensor) and labels.shape == attention_mask.shape else None
    targets = causal_targets(causal, None, None) if causal is not None else None
    return token_mask(attention_mask, targets, tuple(attention_mask.shape))


def _batch_size(batch: Any) -> int:
    values = batch.values() if isinstance(batch, Mapping) else batch
    for value in values:
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise TypeError("cannot infer the batch size: the batch holds no tensor")


def choose_step(config: FisherConfig, loss_fn: LossFn | None, sample_fn: SampleFn | None) -> Step:
    """The step of this collection, from the Fisher type and whether a custom loss is given.

    Raises:
        ValueError: the true Fisher with a `loss_fn` but no `sample_fn`.
    """
    true_fisher = config.fisher == "true"
    if loss_fn is None:
        return DefaultLossStep(SampledLabels(config.n_samples) if true_fisher else DataLabels())
    if true_fisher and sample_fn is None:
        raise ValueError("the true Fisher with a custom loss_fn needs sample_fn(model, batch, generator) -> batch")
    batches = SampledBatches(sample_fn, config.n_samples) if sample_fn is not None and true_fisher else DataBatch()
    return CustomLossStep(loss_fn, batches, mean_reduced=config.loss_reduction == "mean")
