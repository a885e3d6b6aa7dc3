"""``verdict.md`` and ``forest.png``: the stage-2 verdict (:mod:`.verdict`) as tables and a forest plot,
written by ``fisherlora report`` whenever its folders hold stage-2 runs."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ..files import atomic_write_bytes
from .default_rule import format_default_choice
from .formatting import MISSING, fmt, fmt_p
from .machines import stage_two_machines
from .paired import smallest_sign_flip_p
from .plots import plot_forest
from .results import load_runs
from .summary import summarize
from .verdict import ALPHA, POWER, Row, TaskVerdict, Verdict, verdict

VERDICT_FILE = "verdict.md"
FOREST_PLOT = "forest.png"

LEGEND = (
    "Each row: a method against its task's best baseline (the baseline with the best stage-1 validation metric), "
    "paired by evaluation seed (stage 2: fresh seeds, each method at its stage-1 LR). Δ: mean of ours - baseline "
    "with its 95% Student-t interval; Δ/sd: Δ divided by the task's seed-to-seed sd of paired differences "
    "(median over the compared methods); p: exact two-sided sign-flip test, then Holm-adjusted across the methods "
    f"compared; MDE: the smallest true Δ found with {POWER:.0%} power by a paired t-test at level {ALPHA:g}/k "
    "(k compared methods; Holm's strictest step) at that sd, ∞ where the exact sign-flip test cannot reach that "
    "level with so few seeds (its smallest p, 2^(1-n), is above it); collapsed: runs whose test predictions fell "
    "in one class (kept in every mean). Reading: better/worse when Holm's p <= "
    f"{ALPHA:g}; 'equal within ±MDE' when not, the MDE is finite and the interval lies inside ±MDE; otherwise "
    "unresolved. "
    "Pooled: mean over tasks of each task's mean standardized Δ; a task run in several regimes (text, text-long) "
    "counts once, with its regimes' standardized Δ averaged per evaluation seed (Welch-Satterthwaite t interval; "
    "sign-flip over every task's per-seed standardized difference, exact up to 20 in all, else 100,000 seeded "
    "random sign patterns; MDE by the normal approximation); its seeds count one per task and evaluation seed, "
    "its wins/ties/losses and collapsed runs every regime's paired runs (so they can exceed the seeds)."
)


def _mde(value: float, spec: str) -> str:
    """The MDE, ``∞`` where the exact test cannot reject at that number of seeds."""
    return "∞" if value == math.inf else fmt(value, spec)


def _collapsed(count: int | None, runs: int) -> str:
    return MISSING if count is None else f"{count}/{runs}"


def _row(row: Row, digits: str) -> str:
    interval = f"{fmt(row.mean, digits)} [{fmt(row.low, digits)}, {fmt(row.high, digits)}]"
    cells = [row.method, str(row.n), interval, fmt(row.standardized, "+.2f"), fmt_p(row.p_sign_flip),
             fmt_p(row.p_holm), f"{row.wins}/{row.ties}/{row.losses}", _mde(row.mde, ".4f"),
             _collapsed(row.n_collapsed, row.n_runs), row.reading]
    return "| " + " | ".join(cells) + " |"


def _table(rows: Sequence[Row], digits: str, delta: str) -> str:
    head = ["method", "seeds", delta, "Δ/sd", "p (sign-flip)", "p (Holm)", "wins/ties/losses", "MDE", "collapsed",
            "reading"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + [_row(row, digits) for row in rows])


def _task_block(task: TaskVerdict) -> str:
    if task.baseline is None:
        return f"## {task.label}\n\nNo best baseline with stage-2 runs: nothing to compare."
    header = (
        f"## {task.label} ({task.metric_name}) against **{task.baseline}**\n\n"
        f"Seed sd of paired differences: {fmt(task.spread, '.4f')}; {task.n_seeds} evaluation seeds; "
        f"MDE at {task.n_seeds} seeds: {_mde(task.mde, '.4f')}; smallest attainable sign-flip p: "
        f"{fmt_p(smallest_sign_flip_p(task.n_seeds)) if task.n_seeds else MISSING}; baseline collapsed runs: "
        f"{_collapsed(task.baseline_collapsed, task.baseline_runs)}."
    )
    return header + "\n\n" + (_table(task.rows, "+.4f", "Δ test [95% CI]") if task.rows else "No compared method.")


def format_verdict(result: Verdict) -> str:
    """Markdown: one table per stage-2 task, the pooled table, then the default-method rule."""
    blocks = [_task_block(task) for task in result.tasks]
    if result.pooled:
        blocks.append("## Pooled across tasks (standardized: Δ / task's seed sd)\n\n"
                      + _table(result.pooled, "+.3f", "standardized Δ [95% CI]"))
    else:
        blocks.append("## Pooled across tasks\n\nNo method has stage-2 comparisons on two or more tasks.")
    if result.machines:
        blocks.append(result.machines)
    if result.default is not None:
        blocks.append(format_default_choice(result.default))
    return "\n\n".join(blocks) + "\n"


def write_verdict(results_dirs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str]
                  ) -> tuple[Path, Path, Verdict] | None:
    """Write ``verdict.md`` and ``forest.png`` into ``out_dir`` from the stage-2 runs of every folder;
    None (nothing written) when no folder has a stage-2 run."""
    runs = [(Path(folder).name, load_runs(folder)) for folder in results_dirs]
    summaries = [summary for _, folder_runs in runs for summary in summarize(folder_runs)]
    if not any(summary.stage == "eval" for summary in summaries):
        return None
    result = replace(verdict(summaries), machines=stage_two_machines(runs))
    target = Path(out_dir)
    sources = ", ".join(f"`{Path(d).name}/runs.jsonl`" for d in results_dirs)
    markdown = (f"# Verdict (stage 2)\n\nGenerated by `fisherlora report` from {sources}.\n\n{LEGEND}\n\n"
                f"{format_verdict(result)}")
    markdown_path = target / VERDICT_FILE
    atomic_write_bytes(markdown_path, markdown.encode("utf-8"))
    return markdown_path, plot_forest(result, target / FOREST_PLOT), result
