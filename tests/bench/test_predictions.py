"""Collapsed runs: the predicted-class shares recorded while the task's evaluator runs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from fisherlora.bench.predictions import PredictionRecorder
from fisherlora.bench.results import ResultsFile
from fisherlora.bench.runner import run_all
from fisherlora.bench.selection import is_collapsed

from .test_runner import CountingFactory, specs


class Scores(nn.Module):
    """Logits given by the caller: ``forward(scores, labels)`` returns them as ``output.logits``."""

    def forward(self, scores: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        return SimpleNamespace(logits=scores)


def test_one_predicted_class_is_a_collapse_and_labels_give_the_majority_accuracy() -> None:
    model = Scores()
    with PredictionRecorder(model) as recorder:
        model(scores=torch.tensor([[0.1, 0.9], [0.2, 0.8], [0.0, 1.0]]), labels=torch.tensor([0, 0, 1]))
        model(scores=torch.tensor([[0.4, 0.6]]), labels=torch.tensor([0]))
    fields = recorder.fields()
    assert fields == {"test_predicted_majority_fraction": 1.0, "test_label_majority_fraction": 0.75}
    assert is_collapsed(fields) is True
    model(scores=torch.tensor([[1.0, 0.0]]))  # outside the block: not counted, hook removed
    assert recorder.predicted == {1: 4}


def test_mixed_predictions_are_not_a_collapse_and_sequence_logits_are_ignored() -> None:
    model = Scores()
    with PredictionRecorder(model) as recorder:
        model(scores=torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.0, 1.0], [0.7, 0.3]]))
        model(scores=torch.zeros(2, 5, 11))  # a language model's (batch, length, vocabulary): ignored
    assert recorder.fields() == {"test_predicted_majority_fraction": 0.5}
    assert is_collapsed(recorder.fields()) is False
    with PredictionRecorder(model) as empty:
        model(scores=torch.zeros(2, 5, 11))
    assert empty.fields() == {} and is_collapsed(empty.fields()) is None


def test_run_records_carry_the_predicted_and_label_shares(tmp_path: Path) -> None:
    results = ResultsFile(tmp_path)
    run_all(specs(["lora"], [1e-3]), results, CountingFactory(), show_progress=False)
    (record,) = results.records()
    assert record["test_label_majority_fraction"] == 0.5  # the tiny task's 12 test labels alternate
    assert 0.5 <= record["test_predicted_majority_fraction"] <= 1.0
