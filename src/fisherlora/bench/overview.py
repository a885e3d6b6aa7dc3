"""Every method across every task: one table and one plot (`fisherlora report DIR DIR ...`).

Each task's own table (:mod:`.report`) says how methods compare on that task; this view answers
"does any initialization win across modalities?": per task each method's test metric and rank,
the paired difference of every Fisher variant against that task's best baseline, and the mean
rank over tasks, on test and on validation (a default should be picked on validation).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..files import atomic_write_bytes
from .plots import plot_overview
from .results import common_folder, load_runs
from .roles import method_order
from .summary import MethodSummary, TaskSummary, rank_of, summarize

OVERVIEW_FILE = "overview.md"
OVERVIEW_PLOT = "overview.png"


def _scored(summary: TaskSummary) -> list[MethodSummary]:
    """The methods of a task that have a result (at least one successful run at a chosen LR)."""
    return [m for m in summary.methods if m.best_lr is not None and math.isfinite(m.test_mean)]


def _stage_one_plan(summary: TaskSummary) -> set[str] | None:
    """The methods stage 1 of the summary's preset runs on its task (`TaskPlan.methods`); None for a
    preset or task the registry does not know (a user's own folder)."""
    from .presets import get_preset

    try:
        preset = get_preset(summary.preset)
    except ValueError:
        return None
    plan = preset.tasks.get(summary.task)
    return set(plan.methods(preset.methods)) if plan is not None else None


def _running(summaries: Sequence[TaskSummary]) -> list[tuple[TaskSummary, set[str], set[str]]]:
    """`(summary, methods it has run, methods expected of it)` of each regime still running: expected are
    the methods its task's regimes have run that its own preset plans (every one of them when the plan
    is unknown), so a method run on one regime only by hand, outside its preset's plan (e.g. a sketch
    option studied on `text` alone), leaves the other regimes complete."""
    by_task: dict[str, set[str]] = {}
    for summary in summaries:
        by_task.setdefault(summary.task, set()).update(m.method for m in summary.methods)
    running = []
    for summary in summaries:
        plan = _stage_one_plan(summary)
        expected = by_task[summary.task] & plan if plan is not None else by_task[summary.task]
        have = {m.method for m in summary.methods}
        if expected - have:
            running.append((summary, have, expected))
    return running


def in_progress(summaries: Sequence[TaskSummary]) -> list[TaskSummary]:
    """The regimes whose stage 1 lacks a method that another regime of the same task has run and their
    own preset plans (e.g. `text-long` while its LR grid is still running, next to a complete `text`)."""
    return [summary for summary, _, _ in _running(summaries)]


def mean_ranks(summaries: Sequence[TaskSummary], split: str = "test") -> dict[str, tuple[float, int]]:
    """``{method: (mean rank over the tasks where it has a result, number of such tasks)}``.

    ``split``: "test" ranks by mean test metric, "validation" by mean validation metric (each at
    the method's validation-selected LR). A task run in several regimes (presets of one task, e.g.
    `text` and `text-long`) counts as one task, as in the verdict: a method's rank in it is the mean
    of its ranks in the regimes. A regime still running (`in_progress`) is left out: a rank among
    the few methods it has run is not a rank among all of them.
    """
    if split not in ("test", "validation"):
        raise ValueError(f"split must be 'test' or 'validation', got {split!r}")
    partial = {id(summary) for summary in in_progress(summaries)}
    by_task: dict[str, dict[str, list[float]]] = {}
    for summary in summaries:
        if id(summary) in partial:
            continue
        scored = _scored(summary)
        values = {m.method: (m.test_mean if split == "test" else m.val_mean) for m in scored}
        for method, rank in rank_of(values).items():
            by_task.setdefault(summary.task, {}).setdefault(method, []).append(rank)
    collected: dict[str, list[float]] = {}
    for ranks in by_task.values():
        for method, regime_ranks in ranks.items():
            collected.setdefault(method, []).append(float(np.mean(regime_ranks)))
    return {method: (float(np.mean(ranks)), len(ranks)) for method, ranks in collected.items()}


def _cell(summary: TaskSummary, method: str, ranks: Mapping[str, float]) -> str:
    scored = {m.method: m for m in _scored(summary)}
    if method not in scored:
        failed = any(m.method == method and m.n_failed for m in summary.methods)
        return "failed" if failed else "–"
    row = scored[method]
    text = f"{row.test_mean:.4f} (#{ranks[method]:g}/{len(scored)})"
    if row.comparison is not None:
        c = row.comparison
        text += f", Δ {c.mean_difference:+.4f}, {c.wins}/{c.ties}/{c.losses}"
    return text


def format_overview(summaries: Sequence[TaskSummary]) -> str:
    """Markdown: one row per method, one column per task, then mean ranks on test and validation."""
    methods = method_order(m.method for s in summaries for m in s.methods)
    task_ranks = [rank_of({m.method: m.test_mean for m in _scored(s)}) for s in summaries]
    test_ranks, val_ranks = mean_ranks(summaries, "test"), mean_ranks(summaries, "validation")
    labels = [f"{s.label} ({s.metric_name})" for s in summaries]
    running = _running(summaries)
    left_out = ("" if not running else " Left out of the mean ranks while their stage 1 runs: " + "; ".join(
        f"{s.label} ({len(expected & have)} of {len(expected)} methods so far)" for s, have, expected in running)
        + ".")
    lines = [
        "Each cell: test metric at the validation-selected LR, mean over seeds (#rank among the methods "
        "with a result); for a Fisher variant also the paired Δ against that task's best baseline and its "
        "wins/ties/losses over seeds. Best baselines: "
        + "; ".join(f"{s.label}: {s.best_baseline or '–'}" for s in summaries) + ". Mean ranks count the "
        "regimes of one task (e.g. text and text-long) as one task, ranked by the mean of its regime ranks."
        + left_out,
        "",
        "| method | " + " | ".join(labels) + " | mean rank, test (tasks) | mean rank, validation (tasks) |",
        "|---|" + "---|" * (len(summaries) + 2),
    ]
    for method in methods:
        cells = [_cell(s, method, ranks) for s, ranks in zip(summaries, task_ranks, strict=True)]
        test = f"{test_ranks[method][0]:.2f} ({test_ranks[method][1]})" if method in test_ranks else "–"
        val = f"{val_ranks[method][0]:.2f} ({val_ranks[method][1]})" if method in val_ranks else "–"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {test} | {val} |")
    return "\n".join(lines) + "\n"


def write_overview(results_dirs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str] | None = None
                   ) -> tuple[Path, Path, list[TaskSummary]]:
    """Summarize every ``results_dirs[i]/runs.jsonl`` together and write ``overview.md`` and
    ``overview.png`` into ``out_dir`` (default: the folders' common parent).

    Stage 1 only (LR grid on the tuning seeds): stage 2's evidence is the verdict (:mod:`.verdict`).

    Returns:
        ``(markdown path, plot path, the stage-1 task summaries in the order of results_dirs)``.
    """
    summaries = [summary for folder in results_dirs for summary in summarize(load_runs(folder))
                 if summary.stage == "tune"]
    target = Path(out_dir) if out_dir is not None else common_folder(results_dirs)
    sources = ", ".join(f"`{Path(d).name}/runs.jsonl`" for d in results_dirs)
    markdown = f"# Across tasks\n\nGenerated by `fisherlora report` from {sources}.\n\n{format_overview(summaries)}"
    markdown_path = target / OVERVIEW_FILE
    atomic_write_bytes(markdown_path, markdown.encode("utf-8"))
    plot_path = plot_overview(summaries, target / OVERVIEW_PLOT)
    return markdown_path, plot_path, summaries
