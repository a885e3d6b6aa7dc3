"""Per-folder tables generated from ``RESULTS_DIR/runs.jsonl`` -- never typed by hand.

- :func:`format_table` -- the markdown table(s) of one or more :class:`TaskSummary` (the CLI prints it).
- :func:`write_report` -- ``summary.md`` plus ``loss_curves_<task>.png`` and ``metric_<task>.png``
  (:mod:`.plots`), each written atomically (temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..files import atomic_write_bytes
from .formatting import MISSING, counted, fmt, fmt_lr, fmt_p
from .plots import plot_loss_curves, plot_metric
from .results import RUNS_FILE, load_runs
from .summary import MethodSummary, TaskSummary, summarize

SUMMARY_FILE = "summary.md"
EDGE_MARK = "⚠ edge"
NO_SWEEP_MARK = "⚠ no sweep"

COLUMNS: tuple[str, ...] = (
    "method",
    "test {metric} mean ± std (n seeds)",
    "best LR",
    "LRs tried",
    "Δ vs best baseline",
    "p (t-test)",
    "p (sign-flip)",
    "wins/ties/losses",
    "steps to LoRA's final loss (reached)",
    "init s (median)",
    "init peak MB",
    "failed runs",
    # Both stages: a run that predicts one class can still score (1.0 on a one-class test split).
    "collapsed runs (one predicted class)",
)


# ----------------------------------------------------------------------------- formatting


def _metric_cell(m: MethodSummary) -> str:
    if not m.seeds:
        return MISSING
    spread = f"{m.test_std:.4f}" if len(m.seeds) > 1 else MISSING  # one seed has no standard deviation
    return f"{m.test_mean:.4f} ± {spread} ({len(m.seeds)})"


def _lr_cell(m: MethodSummary, stage: str) -> str:
    if m.best_lr is None:
        return MISSING
    if stage == "eval":  # fixed by stage 1: no grid here to judge
        return fmt_lr(m.best_lr)
    if not m.swept:
        return f"{fmt_lr(m.best_lr)} ({NO_SWEEP_MARK})"
    return f"{fmt_lr(m.best_lr)} ({EDGE_MARK})" if m.at_edge else fmt_lr(m.best_lr)


def _steps_cell(m: MethodSummary) -> str:
    if not m.steps_to_lora_loss:
        return MISSING
    reached = f"({m.n_reached}/{len(m.steps_to_lora_loss)})"
    if m.steps_median is None:
        return f"not reached {reached}"
    return f"{m.steps_median:g} {reached}"


def _comparison_cells(m: MethodSummary) -> list[str]:
    c = m.comparison
    if c is None:
        return [MISSING] * 4
    delta = f"{fmt(c.mean_difference, '+.4f')} (n={len(c.seeds)})"
    return [delta, fmt_p(c.p_t_test), fmt_p(c.p_sign_flip), f"{c.wins}/{c.ties}/{c.losses}"]


def _collapsed_cell(m: MethodSummary) -> str:
    return MISSING if m.n_collapsed is None else f"{m.n_collapsed}/{len(m.seeds)}"


def _row(m: MethodSummary, summary: TaskSummary) -> list[str]:
    name = f"**{m.method}** (best baseline)" if m.method == summary.best_baseline else m.method
    cells = [
        name,
        _metric_cell(m),
        _lr_cell(m, summary.stage),
        ", ".join(fmt_lr(lr) for lr in m.lr_grid),
        *_comparison_cells(m),
        _steps_cell(m),
        fmt(m.init_seconds_median, ".3g"),
        fmt(m.init_peak_rss_mb_median, ".0f"),
        f"{m.n_failed}/{m.n_runs}",
    ]
    return [*cells, _collapsed_cell(m)]


def _header(summary: TaskSummary) -> str:
    """The lines above a table: what it is, the best baseline, and what the cells are computed from."""
    seeds = summary.seeds
    grid_sizes = sorted({len(m.lr_grid) for m in summary.methods})
    lrs = str(grid_sizes[0]) if len(grid_sizes) == 1 else f"{grid_sizes[0]}–{grid_sizes[-1]}"
    best = summary.method(summary.best_baseline) if summary.best_baseline else None
    target = fmt(summary.lora_target_loss, ".4g")
    if summary.stage == "eval":
        best_text = (
            f"best baseline **{best.method}** (chosen on stage-1 validation; test {best.test_mean:.4f} at LR "
            f"{fmt_lr(best.best_lr)})" if best else "the best stage-1 baseline has no stage-2 run: no comparison"
        )
        return (
            f"### {summary.task} (preset {summary.preset}, stage 2: eval, metric {summary.metric_name})\n\n"
            f"{best_text}; {counted(len(seeds), 'evaluation seed')} ({', '.join(map(str, seeds))}); each method at its "
            f"stage-1 LR; {counted(summary.n_runs, 'run')}, {summary.n_failed} failed. "
            f"LoRA target loss (median final train loss): {target}."
        )
    best_text = (
        f"best baseline **{best.method}** (test {best.test_mean:.4f} at LR {fmt_lr(best.best_lr)})"
        if best
        else "no baseline succeeded: no comparison"
    )
    return (
        f"### {summary.task} (preset {summary.preset}, metric {summary.metric_name})\n\n"
        f"{best_text}; {counted(len(seeds), 'seed')} ({', '.join(map(str, seeds))}); "
        f"{lrs} LR{'' if lrs == '1' else 's'} per method, "
        f"best LR chosen on validation; {counted(summary.n_runs, 'run')}, {summary.n_failed} failed. "
        f"LoRA target loss (median final train loss at LoRA's best LR): {target}."
    )


def _table(summary: TaskSummary) -> str:
    head = [col.format(metric=summary.metric_name) for col in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(_row(m, summary)) + " |" for m in summary.methods]
    return "\n".join(lines)


def _failures(summary: TaskSummary) -> str:
    if not summary.failed_runs:
        return ""
    items = [
        f"- `{f.run_id}` ({f.method}, LR {fmt_lr(f.lr)}, seed {f.seed}): {f.error.splitlines()[0][:200]}"
        for f in summary.failed_runs
    ]
    return "Failed runs (excluded from every mean):\n\n" + "\n".join(items)


def format_table(summary: TaskSummary | Sequence[TaskSummary]) -> str:
    """Markdown for one task summary (header line, table, failed runs) or several, separated by blank lines."""
    summaries = [summary] if isinstance(summary, TaskSummary) else list(summary)
    blocks = []
    for s in summaries:
        parts = [_header(s), _table(s), _failures(s)]
        blocks.append("\n\n".join(p for p in parts if p))
    return "\n\n".join(blocks) + "\n"


def _provenance(runs: Sequence[dict[str, Any]]) -> str:
    commits = sorted({str(r.get("git_commit", "?")) for r in runs})
    dirty = sum(bool(r.get("git_dirty")) for r in runs)
    return (
        f"Generated by `fisherlora.bench.report` from `{RUNS_FILE}` ({len(runs)} lines); "
        f"git commit(s): {', '.join(commits) or MISSING}; runs from a dirty tree: {dirty}."
    )


def _markdown(runs: Sequence[dict[str, Any]], summaries: Sequence[TaskSummary]) -> str:
    legend = (
        "Columns: test metric at the validation-selected LR, mean ± std (ddof=1) over seeds; "
        f"'{EDGE_MARK}': the best LR is at the end of the grid (extend it); '{NO_SWEEP_MARK}': one LR was run, "
        "so none was chosen; Δ, p and wins/ties/losses: "
        "paired by seed against the best baseline (paired t-test; exact sign-flip test, whose smallest attainable p "
        "with n seeds is 2^(1-n)); steps: median over "
        "seeds (never reached counts as infinite) of the first logged step at or below LoRA's final loss; "
        f"collapsed: runs at the best LR whose test predictions are all one class ('{MISSING}': runs made before "
        "that was recorded)."
    )
    body = format_table(summaries) if summaries else "No runs.\n"
    return f"# Benchmark summary\n\n{_provenance(runs)}\n\n{legend}\n\n{body}"


def plot_label(summary: TaskSummary, summaries: Sequence[TaskSummary]) -> str:
    """File-name label of a task: the task name, prefixed by the preset when a task name repeats within
    a stage, suffixed ``-eval`` for stage 2."""
    repeated = sum(s.task == summary.task and s.stage == summary.stage for s in summaries) > 1
    raw = f"{summary.preset}-{summary.task}" if repeated else summary.task
    raw += "-eval" if summary.stage == "eval" else ""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw)


# ----------------------------------------------------------------------------- entry point


def write_report(results_dir: str | os.PathLike[str], summaries: Iterable[TaskSummary] | None = None) -> Path:
    """Write ``summary.md`` and the two PNGs per task into ``results_dir``; return the summary path.

    ``summaries`` defaults to :func:`summarize` of :func:`load_runs`. Every file is written atomically.
    """
    out = Path(results_dir)
    runs = load_runs(out)
    task_summaries = list(summaries) if summaries is not None else summarize(runs)
    for summary in task_summaries:
        label = plot_label(summary, task_summaries)
        plot_loss_curves(summary, out / f"loss_curves_{label}.png")
        plot_metric(summary, out / f"metric_{label}.png")
    path = out / SUMMARY_FILE
    atomic_write_bytes(path, _markdown(runs, task_summaries).encode("utf-8"))
    return path
