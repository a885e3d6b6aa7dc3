"""`bench-init` on a tiny task: every method timed, ratios against LoRA-GA, files written."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from fisherlora.bench import init_cost
from fisherlora.bench.baselines import AdapterSpec
from fisherlora.bench.tasks import TaskType
from fisherlora.config import FisherConfig

from .test_runner import tiny_task


def test_init_cost_measures_every_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("fisherlora.bench.tasks.build_task", lambda name, **options: tiny_task())
    methods = ["lora_ga", "fisher_svd", "fisher_grad@true", "fisher_svd+sketch"]
    config = init_cost.InitCostConfig(task="text", methods=methods,
                                      calibration_batches=2, batch_size=4, repeats=2, reference_epoch=False,
                                      task_options={"train_size": 16}, fisher=FisherConfig(progress=False),
                                      sketch_rank=4, sketch_threshold=8)
    result = init_cost.run_init_cost(config, tmp_path)
    assert set(result["medians"]) == {"lora_ga", "fisher_svd", "fisher_grad@true", "fisher_svd+sketch"}
    assert all(len(samples) == 2 for samples in result["samples"].values())
    assert result["medians"]["lora_ga"]["ratio_to_lora_ga"] == pytest.approx(1.0)
    for values in result["medians"].values():
        assert values["seconds"] > 0 and values["peak_rss_mb"] > 0 and math.isnan(values["ratio_to_epoch"])
    written = json.loads((tmp_path / "init_cost_text.json").read_text())
    assert written["medians"]["lora_ga"]["ratio_to_epoch"] is None  # NaN is written as null: valid JSON
    assert written["medians"]["fisher_svd"]["seconds"] == result["medians"]["fisher_svd"]["seconds"]
    table = (tmp_path / "init_cost_text.md").read_text()
    assert "| fisher_grad@true |" in table and "x LoRA-GA" in table


@pytest.mark.parametrize(("task_type", "metric_name", "causal_lm"), [
    ("causal_lm", "accuracy", True), ("sequence_classification", "exact_match", False),
])
def test_the_declared_task_type_decides_causal_lm(task_type: TaskType, metric_name: str, causal_lm: bool,
                                                   monkeypatch: pytest.MonkeyPatch):
    seen = []

    def capture(method: str, base: object, spec: AdapterSpec, calibration: object, fisher: object = None) -> None:
        seen.append(spec.causal_lm)
        raise RuntimeError("stop after the adapter spec")

    monkeypatch.setattr("fisherlora.bench.init_cost.build_model", capture)
    task = replace(tiny_task(), task_type=task_type, metric_name=metric_name)
    config = init_cost.InitCostConfig(task="text", methods=["eva"], fisher=FisherConfig(progress=False))
    with pytest.raises(RuntimeError, match="stop after the adapter spec"):
        init_cost._time_method(task, "eva", task.calibration_loader(1, 4, 0), config)
    assert seen == [causal_lm]

