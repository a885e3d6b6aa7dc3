"""The benchmark harness on a tiny random task: records, resume, failures, presets."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fisherlora.bench.baselines import AdapterSpec
from fisherlora.bench.presets import PRESETS, benchmark_methods
from fisherlora.bench.results import ResultsFile
from fisherlora.bench.runner import RunSpec, TrainingConfig, execute, run_all, smoothed_curve, training_batches
from fisherlora.bench.tasks import Task, TaskType, classification_accuracy, list_tasks
from fisherlora.config import FisherConfig
from models import tiny_bert

TRAINING = TrainingConfig(rank=2, alpha=4, batch_size=4, calibration_batches=2, calibration_batch_size=4)


def collate(examples: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([tokens for tokens, _ in examples]),
            "attention_mask": torch.ones(len(examples), 5, dtype=torch.long),
            "labels": torch.tensor([label for _, label in examples])}


def tiny_task() -> Task:
    generator = torch.Generator().manual_seed(0)
    examples = [(torch.randint(1, 50, (5,), generator=generator).tolist(), index % 2) for index in range(40)]
    return Task(name="tiny", config=None, task_type="sequence_classification", metric_name="accuracy",
                model_factory=lambda seed=0: tiny_bert(num_labels=2, seed=seed), target_modules=["query", "value"],
                modules_to_save=["classifier"], train_examples=examples[:16], val_examples=examples[16:28],
                test_examples=examples[28:], collate=collate, evaluate=classification_accuracy, num_labels=2)


def specs(methods: list[str], lrs: list[float], seeds: list[int] = [0]) -> list[RunSpec]:  # noqa: B006
    return [RunSpec(task="tiny", method=m, seed=s, lr=lr, training=TRAINING, fisher=FisherConfig(progress=False))
            for s in seeds for m in methods for lr in lrs]


class CountingFactory:
    def __init__(self, fail_after: int | None = None) -> None:
        self.calls = 0
        self.fail_after = fail_after
        self.task = tiny_task()

    def __call__(self, spec: RunSpec) -> Task:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        return self.task


def test_records_have_the_protocol_fields(tmp_path: Path):
    results = ResultsFile(tmp_path)
    run_all(specs(["lora", "fisher_svd"], [1e-3]), results, CountingFactory(), show_progress=False)
    records = results.records()
    assert [r["method"] for r in records] == ["lora", "fisher_svd"]
    for record in records:
        for key in ("task", "method", "seed", "lr", "metric_name", "val_metric", "test_metric", "config", "curve",
                    "git_commit", "git_dirty", "versions", "machine", "init_seconds", "init_peak_rss_mb",
                    "final_train_loss", "train_seconds"):
            assert key in record, key
        assert "error" not in record, record.get("traceback")
        assert 0.0 <= record["val_metric"] <= 1.0 and 0.0 <= record["test_metric"] <= 1.0
        assert len(record["curve"]["step"]) == len(record["curve"]["train_loss"]) == record["train_steps"] == 4
    assert records[1]["init_stats_mb"] > 0 and records[0]["init_stats_mb"] == 0


def test_resume_skips_finished_runs_and_finishes_the_rest(tmp_path: Path):
    results = ResultsFile(tmp_path)
    plan = specs(["lora", "pissa"], [1e-3, 1e-2])
    with pytest.raises(KeyboardInterrupt):
        run_all(plan, results, CountingFactory(fail_after=2), show_progress=False)
    assert len(results.records()) == 2, "the two finished runs are kept"
    factory = CountingFactory()
    written = run_all(plan, results, factory, show_progress=False)
    assert factory.calls == 2 and len(written) == 2
    assert sorted(r["run_id"] for r in results.records()) == sorted(spec.run_id() for spec in plan)
    again = CountingFactory()
    assert run_all(plan, results, again, show_progress=False) == [] and again.calls == 0
    assert not list(tmp_path.glob(".runs.*")), "no temporary file left"


def test_a_failing_run_is_recorded_not_hidden(tmp_path: Path):
    results = ResultsFile(tmp_path)
    run_all(specs(["lora"], [float("nan")]), results, CountingFactory(), show_progress=False)
    (record,) = results.records()
    assert "non-finite" in record["error"] or "nan" in record["error"].lower()
    assert record["test_metric"] is None  # NaN is written as null: valid JSON
    json.loads((tmp_path / "runs.jsonl").read_text().splitlines()[0])


def test_same_seed_same_data_order_for_every_method():
    task = tiny_task()
    first, second = specs(["lora", "fisher_svd"], [1e-3])
    other_seed = specs(["lora"], [1e-3], seeds=[1])[0]
    batches = [b["input_ids"] for b in training_batches(task, first)]
    assert all(torch.equal(a["input_ids"], b) for a, b in zip(training_batches(task, second), batches, strict=True))
    assert not all(torch.equal(a["input_ids"], b)
                   for a, b in zip(training_batches(task, other_seed), batches, strict=True))


def test_run_id_changes_with_settings():
    (spec,) = specs(["lora"], [1e-3])
    changed = RunSpec(task="tiny", method="lora", seed=0, lr=1e-3, training=TrainingConfig(rank=4),
                      fisher=FisherConfig(progress=False))
    assert spec.run_id() != changed.run_id()
    assert spec.run_id() == specs(["lora"], [1e-3])[0].run_id()


def test_smoothed_curve_keeps_every_step():
    steps, values = smoothed_curve([4.0, 2.0, 3.0, 1.0, 5.0], points=2)
    assert steps == [3, 5] and values == [3.0, 3.0]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_parses(name: str):
    preset = PRESETS[name]
    plan = preset.specs()
    assert plan and len({spec.run_id() for spec in plan}) == len(plan)
    assert set(preset.tasks) <= set(list_tasks())
    assert set(preset.methods) == set(benchmark_methods(preset.variants))
    assert preset.variants == (name != "quick"), "quick runs the plain names only, to stay short"
    if name == "full":
        assert set(preset.tasks) == {"text", "lm", "vision"}
        assert len(preset.seeds) >= 3
        for task in preset.tasks:
            for method in preset.methods:
                grid = {spec.lr for spec in plan if spec.task == task and spec.method == method}
                assert len(grid) >= 3, (task, method, grid)
    for spec in plan:
        assert spec.lr > 0 and math.isfinite(spec.lr)


def test_parallel_writers_lose_no_line(tmp_path: Path):
    import multiprocessing

    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_write_many, args=(str(tmp_path), worker)) for worker in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    records = ResultsFile(tmp_path).records()
    assert sorted(r["run_id"] for r in records) == sorted(f"{w}-{i}" for w in range(3) for i in range(20))


def _write_many(directory: str, worker: int) -> None:
    results = ResultsFile(directory)
    for index in range(20):
        results.append({"run_id": f"{worker}-{index}"})


def test_a_run_finished_by_another_process_meanwhile_is_skipped(tmp_path: Path):
    results = ResultsFile(tmp_path)
    plan = specs(["lora", "pissa"], [1e-3])

    class OtherProcessFinishes(CountingFactory):
        def __call__(self, spec: RunSpec) -> Task:
            # While this process runs "lora", another one appends "pissa".
            results.append({"run_id": plan[1].run_id(), "method": "pissa"})
            return super().__call__(spec)

    factory = OtherProcessFinishes()
    written = run_all(plan, results, factory, show_progress=False)
    assert factory.calls == 1 and [record["method"] for record in written] == ["lora"]


def test_committed_results_keep_their_preset_run_ids():
    """Every committed stage-1 run of the text, lm and vision presets still has the id its preset
    gives it today: run ids must not drift when a library default or a config field changes (a
    resumed benchmark would redo everything). Runs still to do (a benchmark in progress commits
    partial methods) are not required; a run whose (method, seed, LR) the preset no longer plans is
    left alone."""
    import json
    from pathlib import Path

    from fisherlora.bench.presets import get_preset

    root = Path(__file__).resolve().parents[2] / "results"
    for name in ("text", "lm", "vision"):
        records = [json.loads(line) for line in (root / name / "runs.jsonl").read_text().splitlines() if line.strip()]
        planned = {(spec.method, spec.seed, spec.lr): spec.run_id() for spec in get_preset(name).specs()}
        tuned = [record for record in records
                 if record.get("stage", "tune") == "tune" and record.get("preset") == name]
        compared = [record for record in tuned if (record["method"], record["seed"], record["lr"]) in planned]
        assert len(compared) >= 100, f"{name}: only {len(compared)} committed runs match the preset"
        drifted = [record["run_id"] for record in compared
                   if planned[(record["method"], record["seed"], record["lr"])] != record["run_id"]]
        assert not drifted, f"{name}: {len(drifted)} committed run ids differ from the preset's, e.g. {drifted[0]}"


@pytest.mark.parametrize(("task_type", "metric_name", "causal_lm"), [
    ("causal_lm", "accuracy", True), ("sequence_classification", "exact_match", False),
    ("image_classification", "accuracy", False),
])
def test_the_declared_task_type_decides_causal_lm(task_type: TaskType, metric_name: str, causal_lm: bool,
                                                   monkeypatch: pytest.MonkeyPatch):
    seen = []

    def capture(method: str, base: object, spec: AdapterSpec, calibration: object, fisher: object) -> None:
        seen.append(spec.causal_lm)
        raise RuntimeError("stop after the adapter spec")

    monkeypatch.setattr("fisherlora.bench.runner.build_model", capture)
    task = replace(tiny_task(), task_type=task_type, metric_name=metric_name)
    record = execute(specs(["eva"], [1e-3])[0], task, show_progress=False)
    assert "stop after the adapter spec" in record["error"] and seen == [causal_lm]



def test_run_claims_hold_while_their_process_lives_and_pass_when_it_ends(tmp_path: Path):
    import os
    import subprocess
    import sys

    from fisherlora.bench.results import RunClaims

    ours, other = RunClaims(tmp_path), RunClaims(tmp_path)  # two holders of separate locks
    assert other.claim("run-a") and not ours.claim("run-a")
    ours.release("run-a")  # not ours to release
    assert not ours.claim("run-a")
    other.release("run-a")
    assert ours.claim("run-a")
    assert other.claim("run-b")
    os.close(other.held.pop("run-b"))  # its process crashed: the file stays, the lock is gone
    assert ours.claim("run-b"), "a claim without a live holder is taken over"
    assert other.claim("run-c") and ours.held_elsewhere({"run-a", "run-b", "run-c", "run-d"}) == 1
    # another process, killed with SIGKILL while holding a claim (no cleanup of its own)
    code = ("import sys, time; from fisherlora.bench.results import RunClaims; "
            f"assert RunClaims({str(tmp_path)!r}).claim('run-e'); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert not ours.claim("run-e") and ours.held_elsewhere({"run-e"}) == 1
    finally:
        holder.kill()
        holder.wait()
    assert ours.claim("run-e")


def test_an_empty_claim_file_is_not_a_claim(tmp_path: Path):
    """A claim was a file's content (host and pid); a file caught between its creation and its write
    read as a dead holder's and was taken over while its holder ran. A claim is now the lock."""
    from fisherlora.bench.results import RunClaims

    holder, ours = RunClaims(tmp_path), RunClaims(tmp_path)
    assert holder.claim("run-a")
    holder._path("run-a").write_text("")  # whatever the file holds, the lock decides
    assert not ours.claim("run-a")


def test_processes_sharing_a_folder_split_the_runs_and_leave_no_claim(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]):
    import os

    from fisherlora.bench.results import RunClaims

    results = ResultsFile(tmp_path)
    plan = specs(["lora", "pissa", "olora", "gaussian"], [1e-3])
    other = RunClaims(tmp_path)

    class OtherProcess(CountingFactory):
        def __call__(self, spec: RunSpec) -> Task:
            if spec.method == "lora":  # while this process runs lora, another one starts pissa and gaussian
                assert other.claim(plan[1].run_id()) and other.claim(plan[3].run_id())
            if spec.method == "olora":  # ... and dies while running pissa
                os.close(other.held.pop(plan[1].run_id()))
            return super().__call__(spec)

    factory = OtherProcess()
    written = run_all(plan, results, factory, show_progress=False)
    assert [record["method"] for record in written] == ["lora", "olora", "pissa"] and factory.calls == 3
    printed = capsys.readouterr().out
    assert "1 run(s) still running in other processes" in printed  # gaussian
    # each run's line tells the folder's progress: lora done while pissa and gaussian ran elsewhere
    assert "lr=0.001: val=" in printed and "[1/4 in the folder, 2 running elsewhere; about" in printed
    assert "[3/4 in the folder, 1 running elsewhere; about" in printed  # after pissa, gaussian still held
    other.release(plan[3].run_id())
    assert not list((tmp_path / "runs.jsonl.claims").iterdir()), "every claim released"
    with pytest.raises(KeyboardInterrupt):  # an interrupted run releases its claim too
        run_all(specs(["lora"], [1e-2]), results, CountingFactory(fail_after=0), show_progress=False)
    assert not list((tmp_path / "runs.jsonl.claims").iterdir())


def test_progress_note_counts_the_folder_and_shares_the_time_left_among_processes():
    from fisherlora.bench.formatting import progress_note

    assert progress_note(37, 210, 1, 216.0) == ("[37/210 in the folder, 1 running elsewhere; about 5.2 h left at "
                                                "3.6 min per run, 2 processes]")  # 173 runs x 216 s / 2
    assert progress_note(210, 210, 0, 60.0) == "[210/210 in the folder; about 0 min left at 1.0 min per run]"
    # Under an hour in minutes: "about 0.0 h left at 0.5 min per run" with two runs to go said nothing.
    assert progress_note(1, 3, 0, 30.0) == "[1/3 in the folder; about 1 min left at 0.5 min per run]"
    assert progress_note(1, 4, 0, 3600.0) == "[1/4 in the folder; about 3.0 h left at 60.0 min per run]"
