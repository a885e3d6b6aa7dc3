"""The loss and the label draws of one collection, chosen once before the first batch.

Two steps: `DefaultLossStep` computes the sum-reduced cross-entropy from the model's logits itself,
over exactly the loss terms of the model's head (`heads.py`: sequence, token or causal-LM labels);
`CustomLossStep` calls the user's `loss_fn`. Each takes the Fisher type as a draw policy: the
empirical Fisher backpropagates the data's own labels once, the true Fisher `n_samples` labels drawn
from the model's predictive distribution (Martens & Grosse 2015, "Optimizing Neural Networks with
Kronecker-factored Approximate Curvature", sec. 5). `choose_step` picks the step, the policy and the
head's layout once; nothing in the per-batch code asks which Fisher or which loss it computes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import FisherConfig
from .errors import StatisticsError
from .heads import Layout, head_of
from .hooks import Recorder, Step
from .objective import (
    IGNORE_INDEX,
    LossFn,
    LossTerms,
    SampleFn,
    batch_terms,
    default_loss_units,
    logits_of,
    sample_targets,
    sequence_terms,
    split_batch,
    summed_cross_entropy,
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
    """`model(**inputs)` (or `model(inputs)`), then the summed cross-entropy over exactly the loss
    terms of the model's head; the rows of the other examples and positions are dropped."""

    labels: DataLabels | SampledLabels
    layout: Layout | None  # None: read from the logits' shape

    def __call__(self, model: nn.Module, batch: Any, recorder: Recorder, generator: torch.Generator,
                 batch_index: int) -> None:
        forward, labels, attention_mask = split_batch(batch)
        input_ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        early = _terms_before_forward(self.layout, labels, input_ids, attention_mask)
        with recorder.recording(early):
            outputs = forward(model)
        logits = logits_of(outputs)
        layout = self.layout or _layout_of_logits(logits)
        _check_logits_and_labels(layout, logits, labels, self.labels.needs_labels)
        batch_size = int(logits.shape[0])
        if early is None:
            terms = batch_terms(layout, labels, input_ids, attention_mask, batch_size)
        elif early.examples.shape[0] != batch_size:
            raise StatisticsError(f"the model returned logits for {batch_size} examples, but batch {batch_index} "
                                  f"has {early.examples.shape[0]}")
        else:
            terms = early  # batch_terms of the same arguments: the batch size was all it could not know
        assert terms.targets is not None
        targets = terms.targets.to(logits.device)
        recorder.add_forward(terms, terms.count, batch_index)
        for draw in range(self.labels.draws):
            drawn = self.labels.draw(logits, targets, generator)
            recorder.backward(summed_cross_entropy(logits, drawn), terms.count, batch_index,
                              retain=draw < self.labels.draws - 1)


def _terms_before_forward(layout: Layout | None, labels: torch.Tensor | None, input_ids: torch.Tensor | None,
                          attention_mask: torch.Tensor | None) -> LossTerms | None:
    """The batch's loss terms before its forward, where they do not depend on the logits (a declared
    head with integer labels of its shape, or none); None otherwise. They let the hooks copy only
    the kept rows (`Recorder.recording`)."""
    if layout not in ("sequence", "token", "causal"):
        return None
    if labels is not None and (labels.dtype not in (torch.int64, torch.int32)
                               or labels.dim() != (1 if layout == "sequence" else 2)):
        return None
    sized = next((tensor for tensor in (labels, input_ids, attention_mask) if tensor is not None), None)
    if sized is None:
        return None
    try:
        return batch_terms(layout, labels, input_ids, attention_mask, int(sized.shape[0]))
    except (ValueError, RuntimeError, IndexError):
        return None  # a malformed batch: the checks after the forward name what is wrong


def _layout_of_logits(logits: torch.Tensor) -> Layout:
    if logits.dim() == 2:
        return "sequence"
    if logits.dim() == 3:
        return "causal"
    raise StatisticsError(f"logits of shape {tuple(logits.shape)} are neither (B, C) nor (B, S, V); pass loss_fn=")


def _check_logits_and_labels(layout: Layout, logits: torch.Tensor, labels: torch.Tensor | None,
                             needs_labels: bool) -> None:
    expected_dims = 2 if layout == "sequence" else 3
    if logits.dim() != expected_dims:
        raise StatisticsError(f"a {layout} head should give logits with {expected_dims} dimensions, got shape "
                              f"{tuple(logits.shape)}; pass loss_fn=")
    if labels is None:
        if needs_labels and layout != "causal":  # a causal LM predicts its input_ids
            raise StatisticsError(
                "the empirical Fisher needs `labels` in every batch; use fisher='true' for unlabeled data"
            )
        return
    expected_shape = tuple(logits.shape[:-1])
    if tuple(labels.shape) != expected_shape or labels.dtype not in (torch.int64, torch.int32):
        kind = ("classification labels must be a 1-D integer tensor" if layout == "sequence"
                else f"{layout} labels must be an integer tensor of shape {expected_shape}")
        raise StatisticsError(
            f"{kind}, got shape {tuple(labels.shape)} and dtype {labels.dtype}; pass loss_fn= for regression or "
            "multi-label models"
        )


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
    """`loss_fn(model, batch)` per draw; a mean-reduced loss is multiplied back by its loss units.

    The kept rows follow the integer labels as the head's layout reads them (-100: no term; a module
    without a declared head reads `(B,)` labels as a classifier's and labels shaped like
    `attention_mask` as a causal LM's) and the attention mask. An encoder-decoder model keeps every
    row of both stacks, so its batches must have no padding.
    """

    loss_fn: LossFn
    batches: DataBatch | SampledBatches
    mean_reduced: bool
    layout: Layout | None

    def __call__(self, model: nn.Module, batch: Any, recorder: Recorder, generator: torch.Generator,
                 batch_index: int) -> None:
        for draw in range(self.batches.draws):
            drawn_batch = self.batches.draw(model, batch, generator)
            terms = self._terms(drawn_batch, batch_index)
            with recorder.recording(terms):
                loss = self.loss_fn(model, drawn_batch)
            if self.mean_reduced:
                # A mean over N loss units scales every g_t by 1/N; undo it so G does not depend on N.
                loss = loss * default_loss_units(drawn_batch, self.layout)
            # Each draw repeats the forward: tokens count every time (A stays an average), the
            # examples only once.
            recorder.add_forward(terms, terms.count if draw == 0 else 0, batch_index)
            recorder.backward(loss, terms.count, batch_index, retain=False)

    def _terms(self, batch: Any, batch_index: int) -> LossTerms:
        mapping = isinstance(batch, Mapping)
        labels: Any = None
        if mapping:
            labels = batch.get("labels")
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            labels = batch[1]
        labels = labels if isinstance(labels, torch.Tensor) else None
        attention_mask = batch.get("attention_mask") if mapping else None
        size = _batch_size(batch)
        device = next((t.device for t in (labels, attention_mask) if t is not None), torch.device("cpu"))
        if self.layout == "seq2seq":
            _refuse_padding(batch, labels, batch_index)
            return LossTerms(torch.ones(size, dtype=torch.bool, device=device))
        layout = self.layout
        if layout is None and labels is not None:  # a module without a declared head
            causal = attention_mask is not None and labels.shape == attention_mask.shape
            layout = "causal" if causal else "sequence" if labels.dim() == 1 else None
        usable = labels is not None and not labels.is_floating_point() and (
            labels.dim() == 1 if layout == "sequence" else labels.dim() == 2)
        if layout in ("sequence", "token", "causal") and usable:
            return batch_terms(layout, labels, None, attention_mask, size)
        return sequence_terms(None, size, attention_mask, device)


def _refuse_padding(batch: Any, labels: torch.Tensor | None, batch_index: int) -> None:
    keys = ("attention_mask", "decoder_attention_mask")
    masks = {key: batch.get(key) for key in keys} if isinstance(batch, Mapping) else {}
    padded = [key for key, mask in masks.items() if isinstance(mask, torch.Tensor) and bool((mask == 0).any())]
    if labels is not None and not labels.is_floating_point() and bool((labels == IGNORE_INDEX).any()):
        padded.append("labels == -100")
    if padded:
        raise StatisticsError(
            f"an encoder-decoder model keeps every row of both stacks with a loss_fn (there is no mask per stack), "
            f"but batch {batch_index} has padding ({', '.join(padded)}); pass unpadded batches (e.g. batch_size=1, "
            "or sequences of equal length)"
        )


def _batch_size(batch: Any) -> int:
    values = batch.values() if isinstance(batch, Mapping) else batch
    for value in values:
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise TypeError("cannot infer the batch size: the batch holds no tensor")


def choose_step(model: nn.Module, config: FisherConfig, loss_fn: LossFn | None, sample_fn: SampleFn | None) -> Step:
    """The step of this collection, from the model's head, the Fisher type and whether a custom
    loss is given.

    Raises:
        StatisticsError: no `loss_fn` for a head whose loss the default does not reproduce
            (encoder-decoder, regression, multi-label, ...), naming the model class.
        ValueError: the true Fisher with a `loss_fn` but no `sample_fn`.
    """
    head = head_of(model)
    true_fisher = config.fisher == "true"
    if loss_fn is None:
        if head.unsupported is not None:
            raise StatisticsError(
                f"{head.name} {head.unsupported}; pass loss_fn=lambda model, batch: model(**batch).loss with "
                "FisherConfig(loss_reduction='mean') (and sample_fn= for the true Fisher)"
            )
        return DefaultLossStep(SampledLabels(config.n_samples) if true_fisher else DataLabels(), head.layout)
    if true_fisher and sample_fn is None:
        raise ValueError("the true Fisher with a custom loss_fn needs sample_fn(model, batch, generator) -> batch")
    batches = SampledBatches(sample_fn, config.n_samples) if sample_fn is not None and true_fisher else DataBatch()
    return CustomLossStep(loss_fn, batches, mean_reduced=config.loss_reduction == "mean", layout=head.layout)
