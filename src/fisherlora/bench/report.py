"""Tables and plots generated from ``RESULTS_DIR/runs.jsonl`` -- never typed by hand.

- :func:`load_runs` -- the run records, one JSON object per line.
- :func:`format_table` -- the markdown table(s) of one or more :class:`TaskSummary` (the CLI prints it).
- :func:`write_report` -- ``summary.md`` plus ``loss_curves_<task>.png`` and ``metric_<task>.png``,
  each written atomically (temporary file in the same folder, then ``os.replace``).

Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend switch), so the
report renders headless and does not disturb a caller's own matplotlib state.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..files import atomic_write_bytes
from .statistics import MethodSummary, TaskSummary, smooth, summarize

RUNS_FILE = "runs.jsonl"
SUMMARY_FILE = "summary.md"
EDGE_MARK = "⚠ edge"
NO_SWEEP_MARK = "⚠ no sweep"
MISSING = "—"
BASELINE_COLOR = "tab:blue"
OURS_COLOR = "tab:orange"

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
)


# ----------------------------------------------------------------------------- files


def load_runs(results_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Run records from ``results_dir/runs.jsonl``, in file order; blank lines are skipped.

    Raises ``FileNotFoundError`` if the file is missing and ``ValueError`` naming the file and the
    1-based line number for a line that is not a JSON object.
    """
    path = Path(results_dir) / RUNS_FILE
    runs: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {lineno}: corrupt JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise ValueError(f"{path}: line {lineno}: expected a JSON object, got {type(record).__name__}")
            runs.append(record)
    return runs


# ----------------------------------------------------------------------------- formatting


def _fmt_lr(lr: float | None) -> str:
    """Compact scientific notation: 0.0003 -> '3e-4', 0.00015 -> '1.5e-4'."""
    if lr is None or not math.isfinite(lr):
        return MISSING
    mantissa, exponent = f"{lr:.3e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def _fmt(value: float | None, spec: str) -> str:
    """``format(value, spec)``, or a dash for None / NaN."""
    if value is None or not math.isfinite(value):
        return MISSING
    return format(value, spec)


def _fmt_p(p: float) -> str:
    """p-values with three significant digits; NaN (undefined test) as a dash."""
    return _fmt(p, ".3g")


def _metric_cell(m: MethodSummary) -> str:
    if not m.seeds:
        return MISSING
    return f"{m.test_mean:.4f} ± {m.test_std:.4f} ({len(m.seeds)})"


def _lr_cell(m: MethodSummary) -> str:
    if m.best_lr is None:
        return MISSING
    if not m.swept:
        return f"{_fmt_lr(m.best_lr)} ({NO_SWEEP_MARK})"
    return f"{_fmt_lr(m.best_lr)} ({EDGE_MARK})" if m.at_edge else _fmt_lr(m.best_lr)


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
    delta = f"{_fmt(c.mean_difference, '+.4f')} (n={len(c.seeds)})"
    return [delta, _fmt_p(c.p_t_test), _fmt_p(c.p_sign_flip), f"{c.wins}/{c.ties}/{c.losses}"]


def _row(m: MethodSummary, best_baseline: str | None) -> list[str]:
    name = f"**{m.method}** (best baseline)" if m.method == best_baseline else m.method
    return [
        name,
        _metric_cell(m),
        _lr_cell(m),
        ", ".join(_fmt_lr(lr) for lr in m.lr_grid),
        *_comparison_cells(m),
        _steps_cell(m),
        _fmt(m.init_seconds_median, ".3g"),
        _fmt(m.init_peak_rss_mb_median, ".0f"),
        f"{m.n_failed}/{m.n_runs}",
    ]


def _header(summary: TaskSummary) -> str:
    """The lines above a table: what it is, the best baseline, and what the cells are computed from."""
    seeds = summary.seeds
    grid_sizes = sorted({len(m.lr_grid) for m in summary.methods})
    lrs = str(grid_sizes[0]) if len(grid_sizes) == 1 else f"{grid_sizes[0]}–{grid_sizes[-1]}"
    best = summary.method(summary.best_baseline) if summary.best_baseline else None
    best_text = (
        f"best baseline **{best.method}** (test {best.test_mean:.4f} at LR {_fmt_lr(best.best_lr)})"
        if best
        else "no baseline succeeded: no comparison"
    )
    target = _fmt(summary.lora_target_loss, ".4g")
    return (
        f"### {summary.task} (preset {summary.preset}, metric {summary.metric_name})\n\n"
        f"{best_text}; {len(seeds)} seeds ({', '.join(map(str, seeds))}); {lrs} LRs per method, "
        f"best LR chosen on validation; {summary.n_runs} runs, {summary.n_failed} failed. "
        f"LoRA target loss (median final train loss at LoRA's best LR): {target}."
    )


def _table(summary: TaskSummary) -> str:
    head = [col.format(metric=summary.metric_name) for col in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(_row(m, summary.best_baseline)) + " |" for m in summary.methods]
    return "\n".join(lines)


def _failures(summary: TaskSummary) -> str:
    if not summary.failed_runs:
        return ""
    items = [
        f"- `{f.run_id}` ({f.method}, LR {_fmt_lr(f.lr)}, seed {f.seed}): {f.error.splitlines()[0][:200]}"
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
        f"'{EDGE_MARK}': the best LR is at the end of the grid (extend it); Δ, p and wins/ties/losses: "
        "paired by seed against the best baseline (paired t-test; exact sign-flip test, whose smallest attainable p "
        "with n seeds is 2^(1-n)); steps: median over "
        "seeds (never reached counts as infinite) of the first logged step at or below LoRA's final loss."
    )
    body = format_table(summaries) if summaries else "No runs.\n"
    return f"# Benchmark summary\n\n{_provenance(runs)}\n\n{legend}\n\n{body}"


# ----------------------------------------------------------------------------- plots


def _label(summary: TaskSummary, summaries: Sequence[TaskSummary]) -> str:
    """File-name label of a task: the task name, prefixed by the preset when a task name repeats."""
    repeated = sum(s.task == summary.task for s in summaries) > 1
    raw = f"{summary.preset}-{summary.task}" if repeated else summary.task
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw)


def _save_figure(fig: Any, path: Path) -> None:
    """Render ``fig`` to PNG in memory and write it atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())


def _new_figure(width: float, height: float) -> Any:
    """A figure bound to the Agg canvas (headless; independent of pyplot's global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _loss_axis_scale(ax: Any, losses: Sequence[float]) -> None:
    """Log y axis (with plain-number tick labels) when losses are positive and span >= 3x, else linear."""
    if not losses or min(losses) <= 0 or max(losses) / min(losses) < 3.0:
        return
    from matplotlib.ticker import FormatStrFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))


def plot_loss_curves(summary: TaskSummary, path: Path) -> Path:
    """Mean training-loss curve per method at its best LR (baselines dashed, ours solid), LoRA's target dotted."""
    fig = _new_figure(8.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    all_losses: list[float] = []
    longest = max((len(m.mean_curve_steps) for m in summary.methods), default=0)
    # Per-step losses of small batches are noisy; a trailing mean over ~1/8 of the run shows the trend.
    window = max(1, longest // 8)
    for m in summary.methods:
        if not m.mean_curve_steps:
            continue
        ax.plot(
            m.mean_curve_steps, smooth(m.mean_curve_loss, window), linestyle="--" if m.is_baseline else "-",
            label=f"{m.method} (LR {_fmt_lr(m.best_lr)}, n={len(m.seeds)})",
        )
        all_losses += [v for v in m.mean_curve_loss if math.isfinite(v)]
    if summary.lora_target_loss is not None:
        ax.axhline(summary.lora_target_loss, color="gray", linewidth=0.8, linestyle=":", label="LoRA final loss")
    _loss_axis_scale(ax, all_losses)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (mean over seeds)")
    ax.set_title(f"{summary.task} ({summary.preset}): training loss at each method's best LR "
                 f"(trailing mean of {window} points)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    _save_figure(fig, path)
    return path


def plot_metric(summary: TaskSummary, path: Path) -> Path:
    """Test metric mean per method with std error bars; baselines and ours in different colors."""
    fig = _new_figure(max(4.0, 1.0 * len(summary.methods) + 2.0), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    shown = [m for m in summary.methods if m.seeds]
    for x, m in enumerate(shown):
        color = BASELINE_COLOR if m.is_baseline else OURS_COLOR
        ax.errorbar([x], [m.test_mean], yerr=[m.test_std], fmt="o", color=color, capsize=5, markersize=7)
    ax.set_xticks(list(range(len(shown))))
    ax.set_xticklabels([f"{m.method}\n(n={len(m.seeds)})" for m in shown], rotation=30, ha="right")
    ax.set_xlim(-0.5, max(len(shown), 1) - 0.5)
    ax.set_ylabel(f"test {summary.metric_name} (mean ± std over seeds)")
    ax.set_title(f"{summary.task} ({summary.preset}): test {summary.metric_name} at best LR")
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=BASELINE_COLOR, marker="o", linestyle="", label="baseline"),
        Line2D([], [], color=OURS_COLOR, marker="o", linestyle="", label="ours"),
    ]
    ax.legend(handles=handles)
    ax.grid(True, axis="y", alpha=0.3)
    _save_figure(fig, path)
    return path


# ----------------------------------------------------------------------------- entry point


def write_report(results_dir: str | os.PathLike[str], summaries: Iterable[TaskSummary] | None = None) -> Path:
    """Write ``summary.md`` and the two PNGs per task into ``results_dir``; return the summary path.

    ``summaries`` defaults to :func:`summarize` of :func:`load_runs`. Every file is written atomically.
    """
    out = Path(results_dir)
    runs = load_runs(out)
    task_summaries = list(summaries) if summaries is not None else summarize(runs)
    for summary in task_summaries:
        label = _label(summary, task_summaries)
        plot_loss_curves(summary, out / f"loss_curves_{label}.png")
        plot_metric(summary, out / f"metric_{label}.png")
    path = out / SUMMARY_FILE
    atomic_write_bytes(path, _markdown(runs, task_summaries).encode("utf-8"))
    return path


def update_readme(readme: str | os.PathLike[str], results_dir: str | os.PathLike[str]) -> Path:
    """Replace the README section between `<!-- results:NAME:start -->` and `<!-- results:NAME:end -->`
    (NAME = the results folder's name) with the generated tables and links to the plots.

    Raises:
        ValueError: the README has no such markers (named in the message).
    """
    readme_path = Path(readme)
    results_path = Path(results_dir)
    _require_section(readme_path, results_path.name)
    summaries = summarize(load_runs(results_path))
    relative = os.path.relpath(results_path, readme_path.parent)
    plots = []
    for summary in summaries:
        label = _label(summary, summaries)
        plots.append(f"![test metric, {label}]({relative}/metric_{label}.png) "
                     f"![training loss, {label}]({relative}/loss_curves_{label}.png)")
    body = "\n\n".join([format_table(summaries), *plots, f"Generated by `fisherlora report {relative} --readme "
                        f"{readme_path.name}` from `{relative}/runs.jsonl`; full report: `{relative}/summary.md`."])
    return replace_readme_section(readme_path, results_path.name, body)


def update_readme_overview(readme: str | os.PathLike[str], results_dirs: Sequence[str | os.PathLike[str]],
                           summaries: Sequence[TaskSummary], plot_path: Path) -> Path:
    """Fill `<!-- results:overview:start/end -->` with the across-task table of ``summaries`` and
    a link to ``plot_path`` (both from :func:`.overview.write_overview` on ``results_dirs``)."""
    from .overview import format_overview

    readme_path = Path(readme)
    plot = os.path.relpath(plot_path, readme_path.parent)
    folders = " ".join(os.path.relpath(d, readme_path.parent) for d in results_dirs)
    body = "\n\n".join([format_overview(summaries), f"![Fisher variants vs best baseline, every task]({plot})",
                         f"Generated by `fisherlora report {folders} --readme {readme_path.name}`."])
    return replace_readme_section(readme_path, "overview", body)


def _require_section(readme_path: Path, name: str) -> str:
    """The README's text; ValueError naming the file and the markers if section ``name`` is missing."""
    start, end = f"<!-- results:{name}:start -->", f"<!-- results:{name}:end -->"
    text = readme_path.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{readme_path} has no section {start} ... {end} to fill with the {name!r} results")
    return text


def replace_readme_section(readme_path: Path, name: str, body: str) -> Path:
    """Replace the text between `<!-- results:NAME:start -->` and `<!-- results:NAME:end -->`, atomically.

    Raises:
        ValueError: the README has no such markers (named in the message).
    """
    text = _require_section(readme_path, name)
    start, end = f"<!-- results:{name}:start -->", f"<!-- results:{name}:end -->"
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    atomic_write_bytes(readme_path, f"{before}{start}\n{body}\n{end}{after}".encode())
    return readme_path
