"""What a new user of `fisherlora bench` gets wrong, and what the benchmark must do then: refuse bad
values and too-small data before any run, give new runs for edited data, and exit non-zero when
runs fail."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import pytest

from fisherlora.bench import runner, tasks
from fisherlora.bench.cli import _byo_preset
from fisherlora.bench.results import load_runs
from fisherlora.cli import main


def write_csv(path: Path, rows: int, classes: int = 2) -> Path:
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["text", "label"])
        for i in range(rows):
            writer.writerow([f"{['good', 'bad', 'fine'][i % classes]} film number {i}", str(i % classes)])
    return path


def byo_run_ids(data: str, model: str = "model") -> set[str]:
    args = argparse.Namespace(model=model, data=data, test_data=None, text_column="text", label_column="label",
                              targets=None, preset="quick")
    return {spec.run_id() for spec in _byo_preset(args).specs(methods=["lora"])}


@pytest.mark.parametrize(("flag", "value", "named"), [
    ("--lrs", "-0.1", "invalid positive float value: '-0.1'"),
    ("--lrs", "0", "invalid positive float value: '0'"),
    ("--seeds", "-1", "invalid non-negative int value: '-1'"),
])
def test_impossible_learning_rates_and_seeds_are_usage_errors(flag: str, value: str, named: str,
                                                              capsys: pytest.CaptureFixture[str]):
    # A negative LR was planned as runnable and then recorded as a failed run, which counts as done.
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--methods", "lora", flag, value, "--plan"])
    assert exit_info.value.code == 2 and named in capsys.readouterr().err


def test_an_edited_csv_gives_new_runs_and_another_spelling_of_its_path_does_not(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch):
    data, model = write_csv(tmp_path / "my.csv", 40), str(tmp_path / "model")
    first = byo_run_ids(str(data), model)
    monkeypatch.chdir(tmp_path)
    assert byo_run_ids("my.csv", model) == first  # the run ids used to hold the path as typed
    write_csv(data, 41)
    assert byo_run_ids("my.csv", model).isdisjoint(first)  # and not the contents: an edited file resumed old runs


def test_the_csv_task_refuses_contents_changed_since_its_runs_were_planned(tmp_path: Path):
    data = write_csv(tmp_path / "my.csv", 40)
    args = argparse.Namespace(model=str(tasks.minilm_dir()), data=str(data), test_data=None, text_column="text",
                              label_column="label", targets=None, preset="quick")
    options = _byo_preset(args).tasks["csv"].options
    write_csv(data, 41)
    with pytest.raises(ValueError, match="changed since the runs were planned"):
        tasks.build_task("csv", **options)


@pytest.mark.integration
def test_a_csv_too_small_for_the_calibration_batches_is_refused_before_any_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    # 120 rows: every run failed on "calibration asks for 16 x 16 = 256 examples", and the command exited 0.
    data = write_csv(tmp_path / "my.csv", 120)
    out = tmp_path / "out"
    code = main(["bench", "--model", str(tasks.minilm_dir()), "--data", str(data), "--methods", "lora",
                 "--seeds", "0", "--lrs", "1e-3", "--out", str(out), "--threads", "1", "--no-report"])
    error = capsys.readouterr().err
    assert code == 2, error
    assert "draw 16 calibration batches of 16 = 256 training examples" in error and "give a CSV of at least" in error
    with pytest.raises(FileNotFoundError):
        load_runs(out)  # no run was made


@pytest.mark.integration
def test_failed_runs_make_the_command_exit_non_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]):
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("out of memory, say")
    monkeypatch.setattr(runner, "build_model", broken)
    out = tmp_path / "out"
    code = main(["bench", "--methods", "lora", "--seeds", "0", "--lrs", "1e-3", "--out", str(out), "--threads", "1",
                 "--no-report"])
    assert code == 1
    assert "1 of the 1 runs made by this command failed" in capsys.readouterr().err
    assert load_runs(out)[0]["error"] == "RuntimeError: out of memory, say"


def test_report_of_a_folder_without_runs_says_how_to_make_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert f"no runs.jsonl in {tmp_path / 'empty'}: `fisherlora bench --out" in capsys.readouterr().err


def test_a_line_changed_by_hand_is_refused_with_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    (tmp_path / "runs.jsonl").write_text('{"run_id": "a"}\n{"run_id": "b", "val')
    assert main(["report", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "line 2: not valid JSON" in error and "repair or delete it" in error


def test_one_seed_shows_no_standard_deviation():
    # "0.7375 ± 0.0000 (1)" read as a method measured exactly.
    from fisherlora.bench.report import format_table
    from fisherlora.bench.summary import summarize

    from .records import make_run

    table = format_table(summarize([make_run("lora", 1e-3, 0, 0.7, 0.7375),
                                    make_run("pissa", 1e-3, 0, 0.7, 0.70), make_run("pissa", 1e-3, 1, 0.7, 0.72)]))
    assert "0.7375 ± — (1)" in table and "0.7100 ± 0.0141 (2)" in table
    one = format_table(summarize([make_run("lora", 1e-3, 0, 0.7, 0.7375)]))
    assert "1 seed (0); 1 LR per method" in one and "1 run, 0 failed" in one  # was "1 seeds", "1 LRs", "1 runs"


def test_a_test_split_of_one_class_is_refused(tmp_path: Path):
    # 3 'neg' rows in 400: a test split of 'pos' only gave "test 1.0000" to a run that predicts one class.
    train = write_csv(tmp_path / "train.csv", 200)
    test = tmp_path / "test.csv"
    test.write_text("text,label\n" + "".join(f"film {i},1\n" for i in range(10)))
    with pytest.raises(ValueError, match=r"the test split has 1 distinct label\(s\) \['1'\] in 10 examples"):
        tasks.build_task("csv", model_dir=str(tasks.minilm_dir()), train_csv=str(train), test_csv=str(test))


def test_stage_one_tables_count_collapsed_runs():
    # A collapsed run showed only as its accuracy in stage 1 (the count was in stage-2 tables only).
    from fisherlora.bench.report import format_table
    from fisherlora.bench.summary import summarize

    from .records import make_run

    runs = [make_run("lora", 1e-3, seed, 0.7, 0.55, test_predicted_majority_fraction=fraction)
            for seed, fraction in ((0, 1.0), (1, 0.6))]
    row = next(line for line in format_table(summarize(runs)).splitlines() if line.startswith("| **lora**"))
    assert row.endswith("| 0/2 | 1/2 |")  # failed, then collapsed
