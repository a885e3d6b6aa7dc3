"""`bench-init` on a tiny task: every method timed, ratios against LoRA-GA, files written."""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fisherlora.bench import init_cost
from fisherlora.bench.baselines import AdapterSpec
from fisherlora.bench.floor import forward_backward_floor
from fisherlora.bench.init_cost import format_init_cost
from fisherlora.bench.tasks import TaskType
from fisherlora.cli import main
from fisherlora.config import FisherConfig
from fisherlora.phases import PHASES, record_phases

from .test_runner import tiny_task


def test_init_cost_measures_every_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("fisherlora.bench.tasks.build_task", lambda name, **options: tiny_task())
    methods = ["lora_ga", "fisher_svd", "fisher_grad@true", "fisher_svd+sketch"]
    config = init_cost.InitCostConfig(task="text", methods=methods,
                                      calibration_batches=2, batch_size=4, repeats=2, reference_epoch=False,
                                      task_options={"train_size": 16}, fisher=FisherConfig(progress=False),
                                      sketch_rank=4, sketch_threshold=8)
    result = init_cost.run_init_cost(config, tmp_path)
    assert set(result["medians"]) == {"lora_ga", "fisher_svd", "fisher_grad@true", "fisher_svd+sketch", "floor"}
    assert all(len(samples) == 2 for samples in result["samples"].values())
    assert result["medians"]["lora_ga"]["ratio_to_lora_ga"] == pytest.approx(1.0)
    assert result["medians"]["floor"]["ratio_to_floor"] == pytest.approx(1.0)
    for method, values in result["medians"].items():
        assert values["seconds"] > 0 and values["peak_rss_mb"] > 0 and math.isnan(values["ratio_to_epoch"])
        # Every method and the floor run forward and backward passes; only ours accumulate statistics.
        assert values["forward_seconds"] > 0 and values["backward_seconds"] > 0, method
        assert (values["statistics_seconds"] > 0) == method.startswith("fisher"), method
        assert (values["factorization_seconds"] > 0) == (method != "floor"), method
    for runs in result["samples"].values():
        for run in runs:  # the phases are disjoint parts of the wall time
            parts = sum(run[f"{phase}_seconds"] for phase in PHASES)
            assert parts <= run["seconds"] and run["other_seconds"] == pytest.approx(run["seconds"] - parts)
    written = json.loads((tmp_path / "init_cost_text.json").read_text())
    assert written["medians"]["lora_ga"]["ratio_to_epoch"] is None  # NaN is written as null: valid JSON
    assert written["medians"]["fisher_svd"]["seconds"] == result["medians"]["fisher_svd"]["seconds"]
    table = (tmp_path / "init_cost_text.md").read_text()
    assert "| fisher_grad@true |" in table and "x LoRA-GA" in table and "x floor" in table
    assert "| factorization s |" in table and "| floor |" in table
    assert "| arith. x LoRA-GA | arith. x floor |" in table and "\narith.: multiply-adds per token" in table
    _check_work_per_token(written["work_per_token"], config)


def _check_work_per_token(work: dict, config: init_cost.InitCostConfig) -> None:
    """The arithmetic ratios of each entry, with its own statistics settings (see test_work_count.py for the counts)."""
    methods = work["methods"]
    assert methods["lora_ga"]["arithmetic_to_lora_ga"] == pytest.approx(1.0)
    assert methods["lora_ga"]["arithmetic_to_floor"] == pytest.approx(1.5)
    assert methods["floor"]["arithmetic_to_lora_ga"] == pytest.approx(2 / 3)
    assert methods["floor"]["arithmetic_to_floor"] == 1
    assert work["lora_ga"] == pytest.approx(3 * work["forward"]) and work["forward"] > 0
    svd, sketched, true = methods["fisher_svd"], methods["fisher_svd+sketch"], methods["fisher_grad@true"]
    assert not svd["with_grad_mean"] and svd["grad_mean"] == 0 and svd["sketch_threshold"] is None
    assert (sketched["sketch_threshold"], sketched["sketch_rank"]) == (config.sketch_threshold, config.sketch_rank)
    assert sketched["factors"] != svd["factors"]
    assert true["with_grad_mean"] and true["label_draws"] == config.fisher.n_samples
    for entry in (svd, sketched, true):
        assert entry["multiply_adds"] == pytest.approx((1 + entry["label_draws"]) * work["forward"]
                                                       + entry["factors"] + entry["grad_mean"])
        assert entry["arithmetic_to_floor"] == pytest.approx(entry["multiply_adds"] / work["floor"])
    assert {layer["name"] for layer in work["layers"]} == {f"bert.encoder.layer.{block}.attention.self.{name}"
                                                           for block in (0, 1) for name in ("query", "value")}


def test_count_only_prints_the_arithmetic_and_times_nothing(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture):
    monkeypatch.setattr("fisherlora.bench.tasks.build_task", lambda name, **options: tiny_task())
    monkeypatch.setattr("fisherlora.bench.init_cost.build_model", lambda *args, **kwargs: pytest.fail("timed"))
    assert main(["bench-init", "--count-only", "--methods", "lora_ga,fisher_zero,pissa", "--batches", "2",
                 "--batch-size", "4", "--targets", "all-linear"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in lines[2:5]] == ["| lora_ga", "| fisher_zero", "| floor"]
    assert lines[2].endswith("| 1.00 | 1.50 |") and lines[4].endswith("| 0.67 | 1.00 |")
    assert lines[-3].startswith("arith.: multiply-adds per token")
    assert lines[-1] == ("Not counted: pissa (only the floor, lora_ga and the methods with Fisher statistics are).")
    assert main(["bench-init", "--count-only", "--methods", "pissa", "--no-floor", "--batches", "1"]) == 2
    assert "none of ['pissa'] is counted" in capsys.readouterr().err
    assert main(["bench-init", "--count-only", "--readme", "README.md"]) == 2
    assert "--count-only writes no file" in capsys.readouterr().err


def test_an_old_result_without_the_arithmetic_formats_as_before():
    """Results written before the arithmetic ratios (committed ones) keep their columns, no legend; those
    written with it show its columns. Every committed table is well formed either way."""
    paths = sorted(Path(__file__).parents[2].glob("results/init_cost*/init_cost_*.json"))
    old = [path for path in paths if "work_per_token" not in json.loads(path.read_text())]
    assert old and len(old) < len(paths), "expected committed results both before and after the arithmetic columns"
    for path in paths:
        lines = format_init_cost(json.loads(path.read_text())).splitlines()
        assert ("arith." in "\n".join(lines)) == (path not in old), path
        header, rule, rows = lines[2], lines[3], lines[4:]
        rows = [row for row in rows if row.startswith("|")]
        assert rule.count("|---") == header.count(" | ") + 1 and rows, path
        assert all(row.count(" | ") == header.count(" | ") for row in rows), path


def test_all_linear_is_every_linear_layer_but_the_head():
    task = tiny_task()
    names = init_cost.resolve_targets(task, "all-linear")
    model = task.model_factory(0)
    linear = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    assert set(names) == linear - {"classifier"} and "bert.encoder.layer.0.attention.self.key" in names
    assert init_cost.resolve_targets(task, None) == task.target_modules
    assert init_cost.resolve_targets(task, ["key"]) == ["key"]


def test_the_floor_takes_no_weight_gradient_and_restores_the_model():
    task = tiny_task()
    model = task.model_factory(0)
    model.train()
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    with record_phases() as phases:
        forward_backward_floor(model, task.calibration_loader(2, 4, 0))
    assert phases["forward"] > 0 and phases["backward"] > 0
    assert all(parameter.grad is None for parameter in model.parameters())
    assert model.training and not frozen.requires_grad
    assert all(parameter.requires_grad for parameter in model.parameters() if parameter is not frozen)


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



def test_bench_init_fills_the_readme_section_from_its_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("fisherlora.bench.tasks.build_task", lambda name, **options: tiny_task())
    out = tmp_path / "init_cost_all_linear"
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:init_cost_all_linear:start -->\nold\n"
                      "<!-- results:init_cost_all_linear:end -->\n")
    argv = ["bench-init", "--methods", "lora", "--repeats", "1", "--no-epoch", "--batches", "1", "--batch-size", "4",
            "--targets", "all-linear", "--out", str(out), "--readme", str(readme)]
    assert main(argv) == 0
    result = json.loads((out / "init_cost_text.json").read_text())
    assert result["command"] == shlex.join(["fisherlora", *argv]) and result["targets"] == "all-linear"
    assert "bert.encoder.layer.0.attention.output.dense" in result["target_modules"]
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n")
    assert result["command"] in text and format_init_cost(result) in text


def test_bench_init_refuses_a_missing_readme_section_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("fisherlora.bench.tasks.build_task", lambda name, **options: pytest.fail("work started"))
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    assert main(["bench-init", "--out", str(tmp_path / "costs"), "--readme", str(readme)]) == 2
    assert main(["bench-init", "--targets", "all-linear,query"]) == 2


def test_work_legend_gives_the_untargeted_forward_its_unit():
    """A small untargeted forward (a classifier head, per token) printed as a bare '18' read as a count of
    layers; both sizes carry the unit."""
    from fisherlora.bench.init_cost import _work_legend

    for value, shown in ((18.0, "18 multiply-adds per token"), (28.3e6, "28.3 M multiply-adds per token")):
        legend = _work_legend({"forward": 1.06e7, "untargeted_forward": value})
        assert f"(their forward: {shown})" in legend


@pytest.mark.parametrize(("start", "end", "threads", "warned"), [
    ([0.1, 0.2, 0.3], [1.1, 0.9, 0.5], 1, False),   # only this process
    ([1.9, 1.5, 1.2], [2.9, 2.5, 2.0], 1, True),    # two workers were running all along
    ([0.2, 0.1, 0.1], [2.8, 1.0, 0.4], 1, True),    # others started meanwhile
    ([0.2, 0.1, 0.1], [2.2, 1.9, 1.0], 2, False),   # this process on two threads
    (None, None, 1, False),                           # no load average on this platform
])
def test_a_measurement_next_to_other_processes_is_flagged(start, end, threads: int, warned: bool):
    warning = init_cost.contention_warning({"start": start, "end": end}, threads)
    assert (warning is not None) == warned
    if warned:
        assert f"load average at the start {start[0]:.2f}" in warning and f"{threads} thread(s)" in warning


def test_the_load_average_is_recorded_shown_and_warned_about(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture):
    import os

    monkeypatch.setattr("fisherlora.bench.tasks.build_task", lambda name, **options: tiny_task())
    monkeypatch.setattr(os, "getloadavg", lambda: (2.5, 2.25, 2.0))
    config = init_cost.InitCostConfig(task="text", methods=["lora_ga"], calibration_batches=1, batch_size=4,
                                      repeats=1, reference_epoch=False, floor=False,
                                      task_options={"train_size": 16}, fisher=FisherConfig(progress=False))
    result = init_cost.run_init_cost(config, tmp_path)
    assert result["load_average"] == {"start": [2.5, 2.25, 2.0], "end": [2.5, 2.25, 2.0]}
    assert json.loads((tmp_path / "init_cost_text.json").read_text())["load_average"]["end"] == [2.5, 2.25, 2.0]
    assert "; 1-minute load average at start 2.50, end 2.50" in (tmp_path / "init_cost_text.md").read_text()
    assert "warning: other processes ran during the measurement" in capsys.readouterr().err
    del result["load_average"]  # a result written before the field: its header as it was
    assert "load average" not in format_init_cost(result)
