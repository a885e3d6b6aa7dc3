"""Benchmark stages: records carry their stage, old records read as stage 1, and stage-2 summaries
take each method's LR and the best baseline from stage 1's validation metric, never from a test metric."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fisherlora.bench.presets import Preset, TaskPlan
from fisherlora.bench.report import format_table
from fisherlora.bench.results import ResultsFile, load_runs
from fisherlora.bench.runner import RunSpec, TrainingConfig
from fisherlora.bench.selection import stage_of
from fisherlora.bench.stages import EVAL_TEST_OPTIONS, EvalStage, default_methods, eval_specs
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


def test_committed_runs_carry_a_stage_and_stage_two_seeds_are_fresh() -> None:
    """Every committed run says its stage; stage-2 runs never reuse a stage-1 seed."""
    for name in ("text", "lm", "vision"):
        runs = load_runs(ROOT / "results" / name)
        assert {run.get("stage") for run in runs} <= {"tune", "eval"}, name
        tune_seeds = {run["seed"] for run in runs if run["stage"] == "tune"}
        eval_seeds = {run["seed"] for run in runs if run["stage"] == "eval"}
        assert not tune_seeds & eval_seeds, name


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
    # pissa is best on test, lora on validation: both stages take the validation choice
    assert tune.best_baseline == "lora"
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

    results = ResultsFile(tmp_path)
    for run in _stage_two_runs():
        results.append(run)
    text = write_report(tmp_path).read_text(encoding="utf-8")
    assert "stage 2: eval" in text
    for name in ("loss_curves_t.png", "metric_t.png", "loss_curves_t-eval.png", "metric_t-eval.png"):
        assert (tmp_path / name).is_file(), name


# ----------------------------------------------------------------------------- planning stage 2


def _tune(method: str, vals: dict[float, float], seeds: range = range(2), **extra: Any) -> list[dict[str, Any]]:
    """Stage-1 runs of ``method``: validation ``vals[lr]``, test the opposite order (never to be read)."""
    return [make_run(method, lr, s, val, 1.0 - val, run_id=f"{method}/{lr}/{s}", **extra)
            for s in seeds for lr, val in vals.items()]


def _preset(methods: list[str]) -> Preset:
    plan = TaskPlan(lrs=[1e-4, 1e-3, 1e-2], training=TrainingConfig(rank=2), options={"train_size": 16})
    return Preset(name="p", description="test", tasks={"t": plan}, seeds=[0, 1], method_list=methods)


BRACKETED = {1e-4: 0.5, 1e-3: 0.8, 1e-2: 0.6}


def test_eval_specs_take_the_stage_one_lr_fresh_seeds_and_larger_test_sets() -> None:
    runs = _tune("lora", {1e-4: 0.5, 1e-3: 0.6, 1e-2: 0.55}) + _tune("fisher_svd", BRACKETED)
    settings = EvalStage(seeds=(100, 101, 102), test_options={"t": {"test_size": 500}})
    specs = eval_specs(_preset(["lora", "fisher_svd"]), runs, settings)
    assert [(s.seed, s.method, s.lr) for s in specs[:2]] == [(100, "lora", 1e-3), (100, "fisher_svd", 1e-3)]
    assert len(specs) == 6 and {s.seed for s in specs} == {100, 101, 102} and {s.stage for s in specs} == {"eval"}
    assert specs[0].task_options == {"train_size": 16, "test_size": 500} and specs[0].preset == "p"
    assert len({s.run_id() for s in specs}) == 6


def test_eval_specs_refuse_naming_every_method_without_a_bracketed_lr() -> None:
    runs = (_tune("lora", BRACKETED) + _tune("fisher_svd", {1e-4: 0.5, 1e-3: 0.6, 1e-2: 0.7})
            + _tune("fisher_eig", {1e-3: 0.7}) + _tune("fisher_grad", {1e-3: 0.7}, error="OOM"))
    preset = _preset(["lora", "fisher_svd", "fisher_eig", "fisher_grad", "fisher_select"])
    with pytest.raises(ValueError) as raised:
        eval_specs(preset, runs)
    message = str(raised.value)
    assert "fisher_svd: best LR 1e-2 sits at an edge of its grid (1e-4, 1e-3, 1e-2)" in message
    assert ("fisher_eig: stage 1 unfinished, 4 of its 6 stage-1 runs missing (seed 0 at 1e-4, 1e-2; "
            "seed 1 at 1e-4, 1e-2)") in message
    assert "fisher_grad: stage 1 unfinished, 4 of its 6" in message
    assert "fisher_select: no stage-1 (tune) run" in message and "lora:" not in message
    # stage-2 runs in the folder never count as stage 1
    evaluation = _tune("fisher_select", BRACKETED, seeds=range(100, 102), stage="eval")
    with pytest.raises(ValueError, match="fisher_select: no stage-1"):
        eval_specs(_preset(["lora", "fisher_select"]), runs + evaluation)


def test_eval_specs_refuse_a_method_whose_stage_one_lacks_a_seed() -> None:
    """A method run on seed 0 only has every LR "on every seed it has": the LR was picked on one seed
    while its peers had two (text-long planned 210 stage-2 runs with 9 stage-1 runs missing)."""
    runs = _tune("lora", BRACKETED) + _tune("fisher_svd", BRACKETED, seeds=range(1))
    with pytest.raises(ValueError) as raised:
        eval_specs(_preset(["lora", "fisher_svd"]), runs)
    message = str(raised.value)
    assert "fisher_svd: stage 1 unfinished, 3 of its 6 stage-1 runs missing (seed 1 at 1e-4, 1e-3, 1e-2)" in message
    assert "lora:" not in message
    # one LR of one seed missing is enough; a failed run counts as run (its LR was tried)
    partly = _tune("lora", BRACKETED) + _tune("fisher_svd", {1e-4: 0.5, 1e-3: 0.8}) + _tune(
        "fisher_svd", {1e-2: 0.6}, seeds=range(1))
    with pytest.raises(ValueError, match=r"fisher_svd: stage 1 unfinished, 1 of its 6 .*\(seed 1 at 1e-2\)"):
        eval_specs(_preset(["lora", "fisher_svd"]), partly)
    failed = partly + _tune("fisher_svd", {1e-2: 0.6}, seeds=range(1, 2), error="diverged")
    assert {s.method: s.lr for s in eval_specs(_preset(["lora", "fisher_svd"]), failed)}["fisher_svd"] == 1e-3


def test_eval_specs_refuse_a_single_lr_grid() -> None:
    plan = TaskPlan(lrs=[1e-3], training=TrainingConfig(rank=2))
    preset = Preset(name="p", description="test", tasks={"t": plan}, seeds=[0, 1], method_list=["lora"])
    with pytest.raises(ValueError, match=r"lora: tried at one LR only \(1e-3\)"):
        eval_specs(preset, _tune("lora", {1e-3: 0.7}))


def test_edge_of_the_lrs_run_on_every_seed_names_the_unfinished_extension() -> None:
    """A grid extension run on one seed so far: the best LR is at the edge of the LRs every seed has, not
    of the whole grid; the message said "edge of its grid (1e-5, 1e-4, ...)" with 1e-4 not an edge there."""
    runs = _tune("lora", {1e-4: 0.8, 1e-3: 0.7, 1e-2: 0.6}) + _tune("lora", {1e-5: 0.5}, seeds=range(1))
    with pytest.raises(ValueError) as raised:
        eval_specs(_preset(["lora"]), runs)
    assert ("lora: best LR 1e-4 sits at an edge of the LRs run on every seed (1e-5, 1e-4, 1e-3, 1e-2 without 1e-5, "
            "tried on fewer seeds): finish 1e-5 on every stage-1 seed") in str(raised.value)
    finished = runs + _tune("lora", {1e-5: 0.5}, seeds=range(1, 2))
    assert {spec.lr for spec in eval_specs(_preset(["lora"]), finished)} == {1e-4}


def test_eval_specs_take_each_option_variant_at_its_own_stage_one_lr() -> None:
    variant = "fisher_zero+source=gradient"
    runs = (_tune("lora", BRACKETED) + _tune("fisher_zero", BRACKETED)
            + _tune(variant, {1e-5: 0.3, 1e-4: 0.6, 1e-3: 0.5, 1e-2: 0.4}))
    # Asked for by name (by default stage 2 leaves option studies out, see below).
    specs = eval_specs(_preset(["lora", "fisher_zero", variant]), runs, EvalStage(seeds=(100,)),
                       methods=["lora", "fisher_zero", variant])
    assert [(s.method, s.lr) for s in specs] == [("lora", 1e-3), ("fisher_zero", 1e-3), (variant, 1e-4)]
    assert len({s.run_id() for s in specs}) == 3


def test_eval_specs_refuse_stage_one_seeds() -> None:
    runs = _tune("lora", BRACKETED, seeds=range(3))
    with pytest.raises(ValueError, match=r"evaluation seeds \[1, 2\] were used in stage 1"):
        eval_specs(_preset(["lora"]), runs, seeds=[1, 2, 100])


def test_default_methods_keep_the_best_baselines_on_validation_and_every_other_method() -> None:
    runs = (_tune("lora", {1e-3: 0.1, 1e-2: 0.2}) + _tune("pissa", {1e-3: 0.9, 1e-2: 0.8})
            + _tune("olora", {1e-3: 0.7}) + _tune("eva", {1e-3: 0.8}) + _tune("corda", {1e-3: 0.6})
            + _tune("milora", {1e-3: 0.99}, error="diverged") + _tune("fisher_svd", {1e-3: 0.0}))
    by_method: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)
    candidates = ["lora", "pissa", "olora", "eva", "corda", "milora", "gaussian", "fisher_svd", "fisher_eig"]
    chosen = default_methods(candidates, by_method, EvalStage(kept_baselines=3))
    assert chosen == ["lora", "pissa", "olora", "eva", "fisher_svd", "fisher_eig"]


def test_default_methods_leave_option_studies_to_stage_one() -> None:
    """`+KEY=VALUE` names choose a method's default in stage 1; stage 2 runs the default only,
    while `+alloc` and `@true` variants are methods of their own and stay."""
    runs = _tune("lora", {1e-3: 0.1, 1e-2: 0.2}) + _tune("fisher_zero+source=gradient", {1e-3: 0.9, 1e-2: 0.95})
    by_method: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)
    candidates = ["lora", "fisher_zero", "fisher_zero+source=gradient", "fisher_zero+source=gradient+alloc",
                  "fisher_zero+alloc", "fisher_svd@true"]
    chosen = default_methods(candidates, by_method, EvalStage(kept_baselines=3))
    assert chosen == ["lora", "fisher_zero", "fisher_zero+alloc", "fisher_svd@true"]


def test_bench_stage_eval_refuses_before_any_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fisherlora.cli import main

    assert main(["bench", "--preset", "text", "--stage", "eval", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    # an empty folder: one sentence naming the file and the next step, not one line per method
    assert f"{tmp_path / 'runs.jsonl'} holds no stage-1 (tune) run of preset 'text', task 'text'" in error
    assert "fisherlora bench --preset text with the same --out" in error and "lora:" not in error
    assert not (tmp_path / "runs.jsonl").exists()


def test_the_methods_without_a_bracketed_lr_are_listed_one_per_line() -> None:
    runs = _tune("lora", {1e-4: 0.5, 1e-3: 0.6, 1e-2: 0.7}) + _tune("fisher_svd", {1e-4: 0.7, 1e-3: 0.6, 1e-2: 0.5})
    with pytest.raises(ValueError) as raised:
        eval_specs(_preset(["lora", "fisher_svd"]), runs, source="results/p/runs.jsonl")
    lines = str(raised.value).splitlines()
    assert "(results/p/runs.jsonl); 2 method(s) lack one:" in lines[0]
    assert lines[1].startswith("  lora: best LR 1e-2") and lines[2].startswith("  fisher_svd: best LR 1e-4")


def test_stage_two_runs_end_to_end_on_a_tiny_task(tmp_path: Path) -> None:
    from fisherlora.bench.runner import run_all

    from .test_runner import TRAINING, CountingFactory

    plan = TaskPlan(lrs=[1e-4, 1e-3, 1e-2], training=TRAINING)
    preset = Preset(name="p", description="test", tasks={"tiny": plan}, seeds=[0], method_list=["lora"])
    results = ResultsFile(tmp_path)
    for run in _tune("lora", BRACKETED):  # stage 1 as a worker would have recorded it
        results.append({**run, "task": "tiny", "preset": "p", "stage": "tune"})
    specs = eval_specs(preset, results.records(), EvalStage(seeds=(100, 101)))
    written = run_all(specs, results, CountingFactory(), show_progress=False)
    assert [(r["stage"], r["seed"], r["lr"]) for r in written] == [("eval", 100, 1e-3), ("eval", 101, 1e-3)]
    assert all("error" not in r for r in written)
    (evaluation,) = [s for s in summarize(results.records()) if s.stage == "eval"]
    assert evaluation.method("lora").seeds == (100, 101) and evaluation.method("lora").best_lr == 1e-3


def _optimizer_steps(plan: TaskPlan) -> int:
    steps = plan.options["train_size"] // plan.training.batch_size * plan.training.epochs
    return steps if plan.training.max_steps is None else min(steps, plan.training.max_steps)


def test_long_text_regime_has_four_times_the_steps_on_the_same_task() -> None:
    from fisherlora.bench.presets import get_preset

    short, long = get_preset("text").tasks["text"], get_preset("text-long").tasks["text"]
    assert _optimizer_steps(long) >= 4 * _optimizer_steps(short)
    same = ("val_size", "test_size", "max_length")
    assert {k: long.options[k] for k in same} == {k: short.options[k] for k in same}
    text_eval = EVAL_TEST_OPTIONS["text"]
    pool_rest = 10_201 - long.options["train_size"]  # the training pool's unused end (80% of 12,752)
    assert text_eval["test_size"] + text_eval["extra_test_size"] >= 2000 and text_eval["extra_test_size"] <= pool_rest


def test_stage_two_test_sets_are_large_enough() -> None:
    from fisherlora.bench.presets import get_preset

    sizes = {task: options["test_size"] + options.get("extra_test_size", 0)
             for task, options in EVAL_TEST_OPTIONS.items()}
    assert sizes["text"] >= 2000 and sizes["lm"] >= 500 and sizes["vision"] >= 2000
    for task, size in sizes.items():  # larger than stage 1's
        assert size > get_preset(task).tasks[task].options["test_size"]


@pytest.mark.integration
def test_text_extra_test_examples_come_from_the_unused_end_of_the_training_pool() -> None:
    from fisherlora.bench import data
    from fisherlora.bench.tasks import build_task

    sizes = {"train_size": 16, "val_size": 8, "test_size": 8, "max_length": 16}
    task = build_task("text", extra_test_size=12, **sizes)
    texts, _ = data.load_rotten_tomatoes()
    train_pool, val_pool, test_pool = data.seeded_split(len(texts), (0.8, 0.1, 0.1), 0)
    expected = [texts[i] for i in test_pool[:8] + train_pool[-12:]]
    assert [text for text, _ in task.test_examples] == expected
    assert set(test_pool[:8] + train_pool[-12:]).isdisjoint(train_pool[:16] + val_pool[:8])
    with pytest.raises(ValueError, match="extra_test_size=10200"):
        build_task("text", extra_test_size=10_200, **sizes)


@pytest.fixture
def paper_method() -> Iterator[str]:
    """A throwaway baseline of the "paper" family, registered for one test."""
    from fisherlora.init.catalog import MethodEntry, add_entry, remove_entry

    add_entry(MethodEntry("paper_init", "paper", "test only", function=lambda *args: None))
    try:
        yield "paper_init"
    finally:
        remove_entry("paper_init")


def test_paper_baselines_always_run_in_stage_two_and_are_compared(paper_method: str) -> None:
    runs = (_tune("lora", {1e-3: 0.1, 1e-2: 0.2}) + _tune("pissa", {1e-3: 0.9, 1e-2: 0.8})
            + _tune("olora", {1e-3: 0.7}) + _tune(paper_method, {1e-3: 0.05}) + _tune("fisher_svd", {1e-3: 0.3}))
    by_method: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)
    candidates = ["lora", "pissa", "olora", paper_method, "fisher_svd"]
    assert default_methods(candidates, by_method, EvalStage(kept_baselines=1)) == ["lora", "pissa", paper_method,
                                                                                   "fisher_svd"]
    runs = [{**run, "test_metric": run["val_metric"]} for run in runs]
    (summary,) = summarize(runs)  # the paper baseline is compared like ours, against the best baseline
    assert summary.best_baseline == "pissa"
    compared = [m.method for m in summary.methods if m.comparison is not None]
    assert compared == [paper_method, "fisher_svd"]
    best_paper = [{**r, "val_metric": 0.99} if r["method"] == paper_method else r for r in runs]
    (summary,) = summarize(best_paper)  # as the best baseline it is the reference, not compared with itself
    assert summary.best_baseline == paper_method
    assert [m.method for m in summary.methods if m.comparison is not None] == ["fisher_svd"]
