"""The report renders from the fixture runs: summary.md with every task and method, valid PNG plots."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from fisherlora.bench.report import format_table, write_report
from fisherlora.bench.results import load_runs
from fisherlora.bench.summary import summarize

FIXTURE = Path(__file__).parent / "fixtures" / "runs.jsonl"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("results")
    shutil.copy(FIXTURE, out / "runs.jsonl")
    write_report(out)
    return out


def test_load_runs_skips_blank_lines() -> None:
    runs = load_runs(FIXTURE.parent)
    assert len(runs) == 43  # the fixture has one blank line among its 43 records
    assert sum(1 for r in runs if "error" in r) == 2
    assert math.isnan(next(r for r in runs if "error" in r)["test_metric"])


def test_load_runs_corrupt_line_names_file_and_line(tmp_path: Path) -> None:
    lines = FIXTURE.read_text().splitlines()[:3]
    (tmp_path / "runs.jsonl").write_text("\n".join([lines[0], "", lines[1], '{"run_id": "half-writ', lines[2]]) + "\n")
    with pytest.raises(ValueError, match=r"runs\.jsonl: line 4"):
        load_runs(tmp_path)
    (tmp_path / "runs.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="line 1"):
        load_runs(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_runs(tmp_path / "missing")


def test_summary_md_has_every_task_and_method(report_dir: Path) -> None:
    text = (report_dir / "summary.md").read_text(encoding="utf-8")
    runs = load_runs(report_dir)
    for task in {r["task"] for r in runs}:
        assert f"### {task} " in text
    for method in {r["method"] for r in runs}:
        assert f"| {method} |" in text or f"| **{method}** (best baseline) |" in text
    assert "best baseline **pissa**" in text and "best baseline **lora**" in text
    assert "3 seeds (0, 1, 2)" in text and "2 seeds (0, 1)" in text


def test_summary_md_cells(report_dir: Path) -> None:
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in (report_dir / "summary.md").read_text(encoding="utf-8").splitlines()
        if line.startswith("| ") and not line.startswith("| method")
    }
    svd = rows["fisher_svd"]
    assert svd[0] == "0.8200 ± 0.0100 (3)"
    assert svd[1] == "1e-3" and svd[2] == "3e-4, 1e-3, 3e-3"
    assert svd[3].startswith("+0.0200") and svd[6] == "2/1/0" and svd[5] == "0.5"
    assert svd[7] == "50 (3/3)"
    assert svd[-2] == "1/9"  # the OOM run is counted
    assert svd[-1] == "—"  # these records predate the collapse fields: nothing to count
    assert "edge" in rows["**pissa** (best baseline)"][1]
    assert "no sweep" in rows["gaussian"][1]
    assert rows["fisher_grad"][-2] == "1/4"
    assert rows["lora"][3] == "—"  # baselines carry no comparison


def test_failed_runs_are_listed(report_dir: Path) -> None:
    text = (report_dir / "summary.md").read_text(encoding="utf-8")
    assert "RuntimeError: CUDA out of memory" in text
    assert "FloatingPointError: loss is nan at step 60" in text
    assert "33 runs, 1 failed" in text and "10 runs, 1 failed" in text


@pytest.mark.parametrize("kind", ["loss_curves", "metric"])
@pytest.mark.parametrize("task", ["rt_minilm", "arith_smollm"])
def test_plots_are_valid_pngs(report_dir: Path, kind: str, task: str) -> None:
    data = (report_dir / f"{kind}_{task}.png").read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)
    assert data[12:16] == b"IHDR"


def test_no_temporary_files_left(report_dir: Path) -> None:
    assert not [p for p in report_dir.iterdir() if p.name.endswith(".tmp")]


def test_format_table_single_and_many() -> None:
    summaries = summarize(load_runs(FIXTURE.parent))
    one = format_table(summaries[0])
    assert one.count("| method |") == 1
    both = format_table(summaries)
    assert both.count("| method |") == 2
    assert "LoRA target loss" in both


def test_report_reflects_the_runs_not_hand_typed(tmp_path: Path) -> None:
    runs = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]
    for run in runs:
        if run["task"] == "rt_minilm" and run["method"] == "fisher_svd" and run["lr"] == 1e-3:
            run["test_metric"] = 0.5
    (tmp_path / "runs.jsonl").write_text("\n".join(json.dumps(r) for r in runs) + "\n")
    text = format_table(summarize(load_runs(tmp_path)))
    assert "| fisher_svd | 0.5000 ± 0.0000 (3)" in text
    assert "0/0/3" in text


def test_loss_plot_with_wide_range_uses_log_axis(tmp_path: Path) -> None:
    from fisherlora.bench.plots import plot_loss_curves

    runs = [
        {"run_id": f"r{s}", "preset": "p", "task": "t", "method": m, "seed": s, "lr": 1e-3, "metric_name": "accuracy",
         "val_metric": 0.5, "test_metric": 0.5, "final_train_loss": 0.05,
         "curve": {"step": [0, 10, 20], "train_loss": [5.0, 0.5, 0.05]}}
        for m in ("lora", "fisher_svd") for s in (0, 1)
    ]
    (summary,) = summarize(runs)
    path = plot_loss_curves(summary, tmp_path / "curves.png")
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_readme_section_is_generated_from_the_runs(tmp_path: Path):
    import shutil

    from fisherlora.bench.readme import update_readme

    results = tmp_path / "results" / "fixture"
    results.mkdir(parents=True)
    shutil.copy(Path(__file__).parent / "fixtures" / "runs.jsonl", results / "runs.jsonl")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:fixture:start -->\nold\n<!-- results:fixture:end -->\noutro\n")
    update_readme(readme, results)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert "| method |" in text and "results/fixture/metric_" in text
    with pytest.raises(ValueError, match="has no section <!-- results:other:start -->"):
        update_readme(readme, tmp_path / "other")
