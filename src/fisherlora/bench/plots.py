"""The benchmark's plots, drawn from the summaries and written atomically as PNG.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend switch), so the
report renders headless and does not disturb a caller's own matplotlib state.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_write_bytes
from .curves import smooth
from .formatting import fmt_lr
from .roles import method_order
from .summary import TaskSummary
from .verdict import Verdict

BASELINE_COLOR = "tab:blue"
OURS_COLOR = "tab:orange"


def save_figure(fig: Any, path: Path) -> None:
    """Render ``fig`` to PNG in memory and write it atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())


def new_figure(width: float, height: float) -> Any:
    """A figure bound to the Agg canvas (headless; independent of pyplot's global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def loss_axis_scale(ax: Any, losses: Sequence[float]) -> None:
    """Log y axis (with plain-number tick labels) when losses are positive and span >= 3x, else linear."""
    if not losses or min(losses) <= 0 or max(losses) / min(losses) < 3.0:
        return
    from matplotlib.ticker import FormatStrFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))


def plot_loss_curves(summary: TaskSummary, path: Path) -> Path:
    """Mean training-loss curve per method at its best LR (baselines dashed, ours solid), LoRA's target dotted."""
    fig = new_figure(8.0, 5.0)
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
            label=f"{m.method} (LR {fmt_lr(m.best_lr)}, n={len(m.seeds)})",
        )
        all_losses += [v for v in m.mean_curve_loss if math.isfinite(v)]
    if summary.lora_target_loss is not None:
        ax.axhline(summary.lora_target_loss, color="gray", linewidth=0.8, linestyle=":", label="LoRA final loss")
    loss_axis_scale(ax, all_losses)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (mean over seeds)")
    ax.set_title(f"{summary.task} ({summary.preset}): training loss at each method's best LR "
                 f"(trailing mean of {window} points)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)
    return path


def plot_metric(summary: TaskSummary, path: Path) -> Path:
    """Test metric mean per method with std error bars; baselines and ours in different colors."""
    fig = new_figure(max(4.0, 1.0 * len(summary.methods) + 2.0), 4.5)
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
    save_figure(fig, path)
    return path


def plot_overview(summaries: Sequence[TaskSummary], path: Path) -> Path:
    """Grouped bars: each compared method's paired Δ (the Fisher variants' and the papers' methods')
    against the best baseline, one bar per task,
    error bars = standard deviation of the per-seed differences. Written atomically as PNG."""
    ours = [m for m in method_order(m.method for s in summaries for m in s.methods)
            if any(x.method == m and x.comparison is not None for s in summaries for x in s.methods)]
    fig = new_figure(max(6.0, 0.9 * len(ours) + 2), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(summaries), 1)
    for index, summary in enumerate(summaries):
        by_name = {m.method: m for m in summary.methods}
        means, errors, positions = [], [], []
        for position, method in enumerate(ours):
            row = by_name.get(method)
            if row is None or row.comparison is None:
                continue
            differences = np.asarray(row.comparison.differences, dtype=float)
            means.append(float(differences.mean()))
            errors.append(float(differences.std(ddof=1)) if differences.size > 1 else 0.0)
            positions.append(position + (index - (len(summaries) - 1) / 2) * width)
        ax.bar(positions, means, width=width, yerr=errors, capsize=3,
               label=f"{summary.label} (vs {summary.best_baseline})")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(ours)), ours, rotation=30, ha="right")
    ax.set_ylabel("Δ test metric vs best baseline")
    # Not "Fisher variants": the papers' methods (LoRA-One, LoRA-GA at its scale, LoRA-DA) are compared too.
    ax.set_title("Each compared method against its task's best baseline (paired by seed; bars: mean ± std)")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    save_figure(fig, path)
    return path


def plot_forest(result: Verdict, path: Path) -> Path:
    """Forest plot: one row per compared method, the standardized paired difference against the best
    baseline with its 95% interval per task (colored) and pooled over tasks (black diamond).

    Standardized = divided by the task's seed-to-seed spread of paired differences, so tasks with
    different metrics share one axis. Written atomically as PNG.
    """
    methods = method_order({row.method for task in result.tasks for row in task.rows})
    series = [(task.label, {row.method: row for row in task.rows}) for task in result.tasks]
    series.append(("pooled", {row.method: row for row in result.pooled}))
    fig = new_figure(8.0, max(3.0, 0.45 * len(methods) * max(len(series), 2) / 2 + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    height = 0.8 / max(len(series), 1)
    for index, (label, rows) in enumerate(series):
        pooled = index == len(series) - 1
        ys, xs, lows, highs = [], [], [], []
        for position, method in enumerate(methods):
            row = rows.get(method)
            if row is None or not math.isfinite(row.standardized):
                continue
            ys.append(len(methods) - 1 - position + 0.4 - (index + 0.5) * height)
            xs.append(row.standardized)
            lows.append(row.standardized - row.standardized_low if math.isfinite(row.standardized_low) else 0.0)
            highs.append(row.standardized_high - row.standardized if math.isfinite(row.standardized_high) else 0.0)
        if xs:
            ax.errorbar(xs, ys, xerr=[lows, highs], fmt="D" if pooled else "o", capsize=3,
                        color="black" if pooled else None, markersize=7 if pooled else 5, label=label)
    ax.axvline(0.0, color="gray", linewidth=0.8)
    ax.set_yticks(range(len(methods)), list(reversed(methods)))
    ax.set_ylim(-0.6, len(methods) - 0.4)
    ax.set_xlabel("paired Δ test metric vs best baseline / task's seed sd of Δ (95% interval)")
    ax.set_title("Stage 2: each method against its task's best baseline (right of 0: better)")
    ax.grid(True, axis="x", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    save_figure(fig, path)
    return path
