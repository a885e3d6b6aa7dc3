"""Benchmark stages: records carry their stage, old records read as stage 1, and stage-2 summaries
take each method's LR and the best baseline from stage 1's validation metric, never from a test metric."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fisherlora.bench.report import format_table
from fisherlora.bench.results import load_runs
from fisherlora.bench.runner import RunSpec
from fisherlora.bench.selection import stage_of
from fisherlora.bench.summary import summarize

from .records import make_run

ROOT = Path(__file__).resolve().parents[2]


def test_records_without_stage_are_stage_one_and_bad_stages_are_named() -> None:
    assert stage_of(make_run("lora", 1e-3, 0, 0.5, 0.5)) == "tune"
    assert stage_of(make_run("lora", 1e-3, 0, 0.5, 0.5, stage="eval")) == "eval"
    with pytest.raises(ValueError, match=r"run 't/lora/0.001/0'.*'final'"):
        stage_of(make_run("lora", 1e-3, 0, 0.5, 0.5, stage="final"))


def test_stage_is_recorded_but_not_part_of_the_run_id() -> None:
    spec = RunSpec(task="t", method="lora", seed=0, lr=1e-3)
    assert spec.stage == "tune"
    assert RunSpec(task="t", method="lora", seed=0, lr=1e-3, stage="eval").run_id() == spec.run_id()


def test_committed_runs_are_marked_stage_one() -> None:
    for name in ("text", "lm", "vision"):
        assert {run.get("stage") for run in load_runs(ROOT / "results" / name)} == {"tune"}, name


def test_migration_marks_only_missing_stages_and_keeps_every_other_byte(tmp_path: Path) -> None:
    lines = [json.dumps(make_run("lora", 1e-3, s, 0.5, 0.5), sort_keys=True) for s in range(2)]
    lines.append(json.dumps(make_run("lora", 1e-3, 100, 0.5, 0.5, stage="eval"), sort_keys=True))
    (tmp_path / "runs.jsonl").write_text("\n".join(lines) + "\n")
    script = ROOT / "scripts" / "mark_tune_stage.py"
    for _ in range(2):  # idempotent
        subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, capture_output=True)
    runs = load_runs(tmp_path)
    assert [run["stage"] for run in runs] == ["tune", "tune", "eval"]
    assert [{k: v for k, v in run.items() if k != "stage"} for run in runs[:2]] == [json.loads(x) for x in lines[:2]]
    assert (tmp_path / "runs.jsonl").read_text().splitlines()[2] == lines[2]


def _stage_two_runs() -> list[dict]:
    # Stage 1: lora best on validation (0.80 vs 0.70) but pissa best on test; fisher_svd's LR 1e-3.
    tune = [make_run("lora", lr, s, val, test) for s in range(2)
            for lr, val, test in ((1e-4, 0.6, 0.6), (1e-3, 0.80, 0.60), (1e-2, 0.7, 0.6))]
    tune += [make_run("pissa", lr, s, val, test) for s in range(2)
             for lr, val, test in ((1e-4, 0.6, 0.6), (1e-3, 0.70, 0.90), (1e-2, 0.6, 0.6))]
    tune += [make_run("fisher_svd", lr, s, val, 0.7) for s in range(2) for lr, val in ((1e-4, 0.6), (1e-3, 0.75),
                                                                                       (1e-2, 0.7))]
    # Stage 2 at fresh seeds; fisher_svd also has a stray run at another LR with a higher validation.
    evaluation = [make_run(m, lr, s, 0.5, test + 0.01 * (s - 100), stage="eval", run_id=f"e/{m}/{lr}/{s}",
                           test_predicted_majority_fraction=1.0 if (m, s) == ("fisher_svd", 101) else 0.6)
                  for s in (100, 101, 102) for m, lr, test in (("lora", 1e-3, 0.70), ("pissa", 1e-3, 0.90),
                                                               ("fisher_svd", 1e-3, 0.72))]
    evaluation.append(make_run("fisher_svd", 1e-2, 100, 0.99, 0.1, stage="eval", run_id="e/stray"))
    return tune + evaluation


def test_stage_two_uses_stage_one_lr_and_validation_best_baseline() -> None:
    tune, evaluation = summarize(_stage_two_runs())
    assert (tune.stage, evaluation.stage) == ("tune", "eval")
    assert tune.best_baseline == "pissa"  # stage-1 tables keep their test-chosen best baseline
    assert evaluation.best_baseline == "lora" and evaluation.seeds == (100, 101, 102)
    ours = evaluation.method("fisher_svd")
    assert ours.best_lr == 1e-3 and ours.test_mean == pytest.approx(0.73)
    assert ours.n_collapsed == 1 and evaluation.method("lora").n_collapsed == 0
    assert ours.comparison is not None and ours.comparison.baseline == "lora"
    assert ours.comparison.differences == pytest.approx((0.02, 0.02, 0.02))
    assert tune.method("fisher_svd").n_collapsed is None


def test_stage_two_table_says_where_lr_and_baseline_come_from() -> None:
    text = format_table(summarize(_stage_two_runs()))
    assert "### t (preset p, metric accuracy)" in text
    assert "### t (preset p, stage 2: eval, metric accuracy)" in text
    assert "best baseline **lora** (chosen on stage-1 validation" in text
    assert "3 evaluation seeds (100, 101, 102)" in text
    assert "| fisher_svd | 0.7300 ± 0.0100 (3) | 1e-3 | 1e-3, 1e-2 |" in text and "| 1/3 |" in text


def test_stage_two_without_stage_one_has_no_comparison() -> None:
    runs = [run for run in _stage_two_runs() if run.get("stage") == "eval"]
    (evaluation,) = summarize(runs)
    assert evaluation.best_baseline is None and evaluation.method("fisher_svd").comparison is None


def test_report_writes_stage_two_plots_apart_from_stage_one(tmp_path: Path) -> None:
    from fisherlora.bench.report import write_report
    from fisherlora.bench.results import ResultsFile

    results = ResultsFile(tmp_path)
    for run in _stage_two_runs():
        results.append(run)
    text = write_report(tmp_path).read_text(encoding="utf-8")
    assert "stage 2: eval" in text
    for name in ("loss_curves_t.png", "metric_t.png", "loss_curves_t-eval.png", "metric_t-eval.png"):
        assert (tmp_path / name).is_file(), name
