"""`fisherlora bench`, `bench-init` and `init` on the command line: list options, names checked
before any work, and logs that are not a terminal."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fisherlora.bench import init_cost, presets, runner, tasks
from fisherlora.bench.results import ResultsFile
from fisherlora.cli import build_parser, main

from .test_runner import TRAINING, tiny_task


class WorkStarted(Exception):
    """Raised by the stand-ins below: the command got past its checks."""


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Replace every place where a command starts working; record what it would have run."""
    seen: dict = {}

    def refuse(name: str):
        def stand_in(*args, **kwargs):
            seen[name] = (args, kwargs)
            raise WorkStarted(name)

        return stand_in

    monkeypatch.setattr(tasks, "build_task", refuse("build_task"))
    monkeypatch.setattr(runner, "run_all", refuse("run_all"))
    monkeypatch.setattr(init_cost, "run_init_cost", refuse("run_init_cost"))
    return seen


def test_every_list_option_takes_commas_or_spaces():
    parser = build_parser()
    args = parser.parse_args(["bench", "--methods", "lora,pissa", "fisher_svd", "--tasks", "text,lm", "--seeds",
                              "0,1", "2", "--lrs", "1e-3,3e-3", "--targets", "query,", "value"])
    assert args.methods == ["lora", "pissa", "fisher_svd"]
    assert args.tasks == ["text", "lm"] and args.seeds == [0, 1, 2] and args.lrs == [1e-3, 3e-3]
    assert args.targets == ["query", "value"]
    args = parser.parse_args(["bench-init", "--methods", "fisher_svd+sketch64@true,pissa", "eva"])
    assert args.methods == ["fisher_svd+sketch64@true", "pissa", "eva"]
    args = parser.parse_args(["init", "--model", "m", "--data", "d.csv", "--text-column", "t", "--label-column", "l",
                              "--out", "o", "--targets", "query,value", "dense"])
    assert args.targets == ["query", "value", "dense"]
    regex = r"model\.layers\.\d{1,2}\.self_attn\.(q|v)_proj"  # a regular expression keeps its commas
    args = parser.parse_args(["init", "--model", "m", "--data", "d.jsonl", "--out", "o", "--targets", regex])
    assert args.targets == [regex]


@pytest.mark.parametrize("argv, message", [
    (["bench", "--seeds", "0,x"], "invalid non-negative int value: '0,x'"),
    (["bench", "--lrs", "1e-3,fast"], "invalid positive float value: '1e-3,fast'"),
    (["bench", "--methods", ","], "argument --methods: expected at least one value"),
    (["bench", "--preset", "nope"], "invalid choice: 'nope'"),
    (["bench-init", "--task", "nope"], "invalid choice: 'nope'"),
    (["init", "--model", "m", "--data", "d", "--text-column", "t", "--label-column", "l", "--out", "o",
      "--method", "fisher_svdd"], "invalid choice: 'fisher_svdd'"),
])
def test_malformed_values_are_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str],
                                          no_work: dict):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not no_work


@pytest.mark.parametrize("argv, named", [
    (["bench", "--methods", "lora,pissa,fisher_svdd"], "'fisher_svdd'"),
    (["bench", "--methods", "lora", "pisa"], "'pisa'"),
    (["bench", "--methods", "pissa@true"], "'pissa@true'"),
    (["bench", "--methods", "fisher_svd@bogus"], "'fisher_svd@bogus'"),
    (["bench", "--methods", "fisher_svd+sketch"], "+sketchK"),
    (["bench", "--methods", "fisher_zero+source=gradiant"], "'weight' or 'natural_gradient' or 'gradient'"),
    (["bench-init", "--methods", "lora+source=gradient"], "'lora' takes no options"),
    (["bench", "--model", "m", "--data", "d.csv", "--methods", "lora,nope"], "'nope'"),
    (["bench", "--methods", "lora", "--tasks", "text,nope"], "['nope']"),
    (["bench", "--methods", "lora", "--tasks", "lm"], "'lm' is in --preset lm"),
    (["bench-init", "--methods", "fisher_svd,nope"], "'nope'"),
])
def test_unknown_names_exit_non_zero_with_the_known_names_before_any_work(
        argv: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_work: dict):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert named in error
    known = "'text'" if "--tasks" in argv else "lora, gaussian, pissa"
    assert known in error, error
    assert error.count("fisher_step") <= 1, f"the known names are listed once: {error}"
    assert not no_work and not out.exists()


def test_a_task_no_preset_runs_is_told_where_presets_are(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(tasks.TASKS, "parity", tasks.TASKS["text"])  # registered, in no preset
    with pytest.raises(ValueError, match=r"no preset runs 'parity'.*src/fisherlora/bench/presets\.py"):
        presets.PRESETS["quick"].specs(tasks=["parity"])
    with pytest.raises(ValueError, match=r"'nope' is not a registered task \(.*text.*\)"):
        presets.PRESETS["quick"].specs(tasks=["nope"])


def test_bench_init_takes_every_task_with_a_preset_of_its_name(monkeypatch: pytest.MonkeyPatch):
    plan = presets.PRESETS["text"].tasks["text"]
    monkeypatch.setitem(presets.PRESETS, "parity", presets.Preset("parity", "a new task", {"parity": plan}, [0]))
    parser = build_parser()
    for task in ("text", "lm", "vision", "parity"):
        assert parser.parse_args(["bench-init", "--task", task]).task == task


def test_bench_init_accepts_the_names_bench_accepts(tmp_path: Path, no_work: dict):
    names = ("lora,pissa+linear,fisher_svd@true,fisher_grad+sketch64,fisher_eig+sketch64@true,"
             "fisher_zero+source=gradient+alloc,fisher_svd+sketch")
    with pytest.raises(WorkStarted):
        main(["bench-init", "--methods", names, "--no-epoch"])
    config = no_work["run_init_cost"][0][0]
    assert config.methods == names.split(",")
    with pytest.raises(WorkStarted):
        main(["bench", "--methods", names.rsplit(",", 1)[0], "--out", str(tmp_path)])
    specs = no_work["run_all"][0][0]
    assert [spec.method for spec in specs] == names.split(",")[:-1]


def test_bench_log_that_is_not_a_terminal_has_one_line_per_run(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch):
    tiny = presets.Preset("tiny", "two quick runs", {"tiny": presets.TaskPlan(lrs=[1e-3], training=TRAINING)},
                          seeds=[0], method_list=["lora"])
    monkeypatch.setitem(presets.PRESETS, "tiny", tiny)
    task = tiny_task()
    monkeypatch.setattr(tasks, "build_task", lambda name, **options: task)
    # capsys stands in for `> log 2>&1`: its streams are not terminals.
    assert main(["bench", "--preset", "tiny", "--methods", "lora,fisher_svd", "--out", str(tmp_path),
                 "--no-report"]) == 0
    captured = capsys.readouterr()
    log = captured.out + captured.err
    assert "\r" not in log, "progress-bar redraws in a log file"
    assert not captured.err.strip(), captured.err
    runs = [line for line in log.splitlines() if re.match(r"\s*tiny (lora|fisher_svd) +seed=0 lr=0.001: val=", line)]
    assert len(runs) == 2, log
    assert [record["method"] for record in ResultsFile(tmp_path).records()] == ["lora", "fisher_svd"]
    assert len(log.splitlines()) <= 12, log  # header, the two runs, the summary table


def test_bench_init_log_that_is_not_a_terminal_has_one_line_per_timed_init(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    task = tiny_task()
    monkeypatch.setattr(tasks, "build_task", lambda name, **options: task)
    assert main(["bench-init", "--methods", "lora,fisher_svd", "--repeats", "2", "--batches", "2", "--batch-size",
                 "4", "--no-epoch", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err, "progress-bar redraws in a log file"
    # The floor is timed with the methods; every other repeat runs them in reverse order.
    assert re.findall(r"^init cost (\d)/6: (\S+) [\d.]+ s$", captured.err, flags=re.M) == [
        ("1", "lora"), ("2", "fisher_svd"), ("3", "floor"), ("4", "floor"), ("5", "fisher_svd"), ("6", "lora")]


def test_bench_says_how_many_runs_other_processes_are_running(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch, no_work: dict):
    from fisherlora.bench.results import RunClaims

    tiny = presets.Preset("tiny", "two quick runs", {"tiny": presets.TaskPlan(lrs=[1e-3, 1e-2], training=TRAINING)},
                          seeds=[0], method_list=["lora"])
    monkeypatch.setitem(presets.PRESETS, "tiny", tiny)
    other = RunClaims(tmp_path)  # another holder (a lock of its own)
    assert other.claim(tiny.specs()[1].run_id())
    with pytest.raises(WorkStarted):
        main(["bench", "--preset", "tiny", "--out", str(tmp_path), "--no-report"])
    printed = capsys.readouterr().out
    assert "2 runs (0 already in " in printed and ", 1 running in other processes sharing the folder)" in printed


def test_a_process_finishing_while_others_run_leaves_the_report_to_the_last(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """A report written by the first process to finish lacks the runs others are still running, and
    could be written after the complete one."""
    from fisherlora.bench.results import RunClaims

    tiny = presets.Preset("tiny", "two quick runs", {"tiny": presets.TaskPlan(lrs=[1e-3, 1e-2], training=TRAINING)},
                          seeds=[0], method_list=["lora"])
    monkeypatch.setitem(presets.PRESETS, "tiny", tiny)
    task = tiny_task()
    monkeypatch.setattr(tasks, "build_task", lambda name, **options: task)
    other = RunClaims(tmp_path)  # another process, running the second run all along
    assert other.claim(tiny.specs()[1].run_id())
    assert main(["bench", "--preset", "tiny", "--out", str(tmp_path)]) == 0
    assert "report: not written, 1 run(s) still running in other processes" in capsys.readouterr().out
    assert not (tmp_path / "summary.md").exists()
    other.release(tiny.specs()[1].run_id())
    assert main(["bench", "--preset", "tiny", "--out", str(tmp_path)]) == 0  # the last one runs it and reports
    assert (tmp_path / "summary.md").exists() and len(ResultsFile(tmp_path).records()) == 2


def test_bench_plan_prints_the_runs_per_method_and_runs_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch, no_work: dict):
    from fisherlora.bench.results import RunClaims

    tiny = presets.Preset("tiny", "plan", {"tiny": presets.TaskPlan(lrs=[1e-3, 1e-2], training=TRAINING)},
                          seeds=[0, 1], method_list=["lora", "pissa"])
    monkeypatch.setitem(presets.PRESETS, "tiny", tiny)
    specs = tiny.specs()  # seed-major: lora 1e-3, lora 1e-2, pissa 1e-3, pissa 1e-2, then seed 1
    results = ResultsFile(tmp_path)
    for spec in specs[:3]:
        results.append({"run_id": spec.run_id(), "task": "tiny", "method": spec.method, "seed": spec.seed,
                        "lr": spec.lr, "preset": "tiny", "stage": "tune", "val_metric": 0.5, "test_metric": 0.5})
    other = RunClaims(tmp_path)
    assert other.claim(specs[4].run_id())  # lora seed 1 at 1e-3, in another process
    assert main(["bench", "--preset", "tiny", "--out", str(tmp_path), "--plan"]) == 0
    printed = capsys.readouterr().out
    assert "| tiny | lora | 1e-3, 1e-2 | 4 | 2 | 1 | 1 |" in printed
    assert "| tiny | pissa | 1e-3, 1e-2 | 4 | 1 | 0 | 3 |" in printed
    assert "run_all" not in no_work and len(results.records()) == 3  # nothing ran
    # stage 2: the same checks as a real start (stage 1 is unfinished here), before anything runs
    assert main(["bench", "--preset", "tiny", "--out", str(tmp_path), "--plan", "--stage", "eval"]) == 2
    assert "stage 1 unfinished" in capsys.readouterr().err
