"""Which classes a classifier predicts on the test set, recorded while the task's own evaluator runs.

A run whose predictions all fall in one class ("collapsed", e.g. to the majority class) scores
the majority-class accuracy without having learned anything; the report counts such runs per
method (:func:`.selection.is_collapsed`) and keeps them in every mean.
"""

from __future__ import annotations

from collections import Counter
from types import TracebackType
from typing import Any

import torch
from torch import nn


class PredictionRecorder:
    """Counts argmax classes (and labels) of every forward call of ``model`` inside the ``with`` block.

    A forward hook on the top-level model sees each evaluation batch once, so the test set is not
    run a second time. Calls whose logits are not ``(batch, classes)`` (a language model's
    ``(batch, length, vocabulary)``) are ignored.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.predicted: Counter[int] = Counter()
        self.labels: Counter[int] = Counter()
        self._handle: Any = None

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        logits = getattr(output, "logits", None)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            return
        self.predicted.update(logits.argmax(dim=-1).tolist())
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() == 1:
            self.labels.update(labels.tolist())

    def __enter__(self) -> PredictionRecorder:
        self._handle = self.model.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._handle.remove()

    def fields(self) -> dict[str, float]:
        """``test_predicted_majority_fraction``: share of the most frequent predicted class;
        ``test_label_majority_fraction``: share of the most frequent label (the accuracy of always
        predicting it). Empty when no classification output was seen."""
        fields = {}
        if self.predicted:
            fields["test_predicted_majority_fraction"] = max(self.predicted.values()) / sum(self.predicted.values())
        if self.labels:
            fields["test_label_majority_fraction"] = max(self.labels.values()) / sum(self.labels.values())
        return fields
