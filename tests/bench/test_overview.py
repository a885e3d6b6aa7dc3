"""The across-task overview: ranks with ties, mean ranks, Δ cells and the README section, from runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fisherlora.bench.overview import format_overview, in_progress, mean_ranks, rank_of, write_overview
from fisherlora.bench.results import ResultsFile
from fisherlora.bench.summary import summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _runs(task: str, test: dict[str, list[float]], val_offset: float = 0.0) -> list[dict[str, Any]]:
    """One LR per method, one run per seed; validation = test + val_offset."""
    return [
        {"run_id": f"{task}|{method}|{seed}", "preset": task, "task": task, "method": method, "seed": seed, "lr": 1e-3,
         "metric_name": "accuracy", "val_metric": value + val_offset, "test_metric": value, "final_train_loss": 0.5,
         "curve": {"step": [0, 10], "train_loss": [1.0, 0.5]}}
        for method, values in test.items() for seed, value in enumerate(values)
    ]


TEXT = {"lora": [0.70, 0.72, 0.74], "pissa": [0.80, 0.80, 0.80], "fisher_svd": [0.81, 0.79, 0.83]}
VISION = {"lora": [0.90, 0.90, 0.90], "pissa+linear": [0.85, 0.86, 0.87], "fisher_svd": [0.80, 0.80, 0.83]}


def test_rank_of_shares_tied_ranks():
    assert rank_of({"a": 0.9, "b": 0.7, "c": 0.9}) == {"a": 1.5, "c": 1.5, "b": 3.0}


def test_mean_ranks_and_cells_follow_the_runs():
    summaries = summarize(_runs("text", TEXT) + _runs("vision", VISION))
    ranks = mean_ranks(summaries)
    # text: fisher_svd 0.81 #1, pissa 0.80 #2, lora 0.72 #3; vision: lora #1, pissa+linear #2, fisher_svd #3.
    assert ranks["fisher_svd"] == (2.0, 2) and ranks["lora"] == (2.0, 2) and ranks["pissa"] == (2.0, 1)
    table = format_overview(summaries)
    # text: best baseline pissa; differences 0.01, -0.01, 0.03 -> mean +0.01, 2 wins, 1 loss.
    assert "| fisher_svd | 0.8100 (#1/3), Δ +0.0100, 2/0/1 | 0.8100 (#3/3), Δ -0.0900, 0/0/3 | 2.00 (2) |" in table
    assert "| pissa+linear | – | 0.8600 (#2/3) |" in table
    assert "text: pissa; vision: lora" in table
    with pytest.raises(ValueError, match="split must be"):
        mean_ranks(summaries, "train")


def test_write_overview_and_readme_section(tmp_path: Path):
    from fisherlora.bench.readme import update_readme_overview

    folders = []
    for task, table in (("text", TEXT), ("vision", VISION)):
        folder = tmp_path / "results" / task
        results = ResultsFile(folder)
        for run in _runs(task, table):
            results.append(run)
        folders.append(folder)
    markdown, plot, summaries = write_overview(folders)
    assert markdown == tmp_path / "results" / "overview.md" and plot.read_bytes().startswith(PNG_MAGIC)
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- results:overview:start -->\nold\n<!-- results:overview:end -->\nb\n")
    update_readme_overview(readme, folders, summaries, plot)
    text = readme.read_text()
    assert "old" not in text and "| fisher_svd |" in text and "(results/overview.png)" in text


def _regime(runs: list[dict[str, Any]], preset: str) -> list[dict[str, Any]]:
    return [{**run, "preset": preset, "run_id": f"{preset}|{run['run_id']}"} for run in runs]


def test_regimes_of_one_task_count_once_and_a_running_regime_is_left_out():
    long_text = {"lora": [0.95, 0.95, 0.95], "pissa": [0.90, 0.90, 0.90], "fisher_svd": [0.80, 0.80, 0.80]}
    complete = summarize(_runs("text", TEXT) + _regime(_runs("text", long_text), "text-long")
                         + _runs("vision", VISION))
    ranks = mean_ranks(complete)
    # text: fisher_svd #1 (text) and #3 (text-long) -> 2 for the task; vision #3 -> (2 + 3) / 2 over 2 tasks.
    # lora: text #3, text-long #1 -> 2; vision #1 -> 1.5. pissa: text #2, text-long #2 -> 2, one task.
    assert ranks["fisher_svd"] == (2.5, 2) and ranks["lora"] == (1.5, 2) and ranks["pissa"] == (2.0, 1)
    table = format_overview(complete)
    assert "| method | text (accuracy) | text-long/text (accuracy) | vision (accuracy) |" in table
    assert "Left out" not in table

    running = summarize(_runs("text", TEXT) + _regime(_runs("text", {"lora": [0.99, 0.99, 0.99]}), "text-long")
                        + _runs("vision", VISION))
    # text-long has run 1 of text's 3 methods: its "#1/1" must not lift lora's mean rank.
    assert mean_ranks(running) == mean_ranks(summarize(_runs("text", TEXT) + _runs("vision", VISION)))
    assert "Left out of the mean ranks while their stage 1 runs: text-long/text (1 of 3 methods so far)." in \
        format_overview(running)


def test_a_method_run_on_one_regime_outside_its_presets_plan_leaves_the_other_regime_complete():
    """The bug: text-long (complete) was left out of the mean ranks because `text` also has a sketch option
    run by hand (`fisher_svd+sketch64`), outside both presets' plans: more methods than text-long."""
    extra = {**TEXT, "fisher_svd+sketch64": [0.85, 0.85, 0.85]}
    long_text = {"lora": [0.95, 0.95, 0.95], "pissa": [0.90, 0.90, 0.90], "fisher_svd": [0.80, 0.80, 0.80]}
    summaries = summarize(_runs("text", extra) + _regime(_runs("text", long_text), "text-long"))
    assert in_progress(summaries) == []
    assert "Left out" not in format_overview(summaries)
