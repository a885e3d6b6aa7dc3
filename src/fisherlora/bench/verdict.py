"""The verdict of stage 2: each method against its task's best baseline, per task and pooled.

Built from the stage-2 (``"eval"``) task summaries (:func:`.summary.summarize`), where every
method runs at its stage-1 learning rate on fresh seeds and the best baseline was chosen on
stage-1 validation. For each compared method (ours and the paper baselines, :func:`.roles.is_compared`),
on each task:

- the paired difference of test metrics (ours - baseline, by seed), its mean and 95% Student-t
  interval (:func:`.paired.mean_interval`);
- the exact two-sided sign-flip test (:func:`.paired.sign_flip_p`) and its Holm adjustment across
  the methods compared on that task (:func:`.paired.holm`); wins / ties / losses;
- the minimum detectable effect (80% power, noncentral t, :func:`.paired.minimum_detectable_effect`)
  at the task's seed-to-seed spread: the median over the compared methods of the standard
  deviation of their paired differences, at level ``alpha / k`` for ``k`` compared methods (Holm's
  strictest step, so conservative);
- collapsed runs (test predictions in one class), counted and kept in every mean.

Pooled across tasks, per method: each task's differences are divided by that task's spread, and
the pooled effect is the mean over tasks of the per-task mean standardized difference. A task run
in several regimes (``text`` and ``text-long``: the same test set and evaluation seeds, so their
differences are not independent) counts once: per evaluation seed, the mean of its regimes'
standardized differences at that seed (of those regimes that ran it). Its
interval is Student-t with the Welch-Satterthwaite degrees of freedom of that mean of means; its
test flips the sign of every standardized difference (weighted ``1 / (T n_t)``), exactly up to 20
seeds in all and from 100,000 seeded random sign patterns above; Holm across methods again; its
detectable effect is the normal approximation at the pooled standard error of unit-spread data.
The task spreads are treated as known (their own uncertainty is ignored).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from scipy import stats

from . import paired
from .default_rule import DefaultChoice, choose_default
from .roles import method_order
from .summary import MethodSummary, TaskSummary

ALPHA = 0.05
POWER = 0.8
POOLED = "pooled"
Reading = Literal["better", "worse", "equal within ±MDE", "unresolved"]


@dataclass(frozen=True)
class Row:
    """One method against the best baseline on one task, or pooled over tasks (``task == "pooled"``).

    ``differences`` are per seed, in the order of ``seeds`` (pooled: every task's, standardized, in task
    order, a task's regimes averaged per seed; ``seeds`` empty). ``mean`` and
    ``low``/``high`` (95% interval) and ``mde`` are in metric units on a task and in task-spread units
    pooled; ``standardized*`` are in task-spread units everywhere. ``n_collapsed``/``n_runs``: the
    method's collapsed runs among its scored runs (None: not recorded).
    """

    method: str
    task: str
    n: int
    mean: float
    low: float
    high: float
    standardized: float
    standardized_low: float
    standardized_high: float
    p_sign_flip: float
    p_holm: float
    wins: int
    ties: int
    losses: int
    mde: float
    n_collapsed: int | None
    n_runs: int
    differences: tuple[float, ...] = ()
    seeds: tuple[int, ...] = ()

    @property
    def reading(self) -> Reading:
        """``better``/``worse`` when Holm's p <= alpha; ``equal within ±MDE`` when not, the MDE is finite
        (the exact test can reject at this number of seeds) and the interval lies inside
        ``[-mde, mde]``; ``unresolved`` otherwise."""
        if math.isfinite(self.p_holm) and self.p_holm <= ALPHA:
            return "better" if self.mean > 0 else "worse"
        if math.isfinite(self.low) and math.isfinite(self.mde) and -self.mde <= self.low and self.high <= self.mde:
            return "equal within ±MDE"
        return "unresolved"


@dataclass(frozen=True)
class TaskVerdict:
    """Every compared method of one stage-2 task summary, against ``baseline``. ``label`` names the
    regime (``text-long/text``), ``task`` the task whose test set and seeds it uses (``text``)."""

    label: str
    task: str
    metric_name: str
    baseline: str | None
    baseline_collapsed: int | None
    baseline_runs: int
    spread: float
    n_seeds: int
    rows: list[Row]

    @property
    def mde(self) -> float:
        """The detectable effect at this task's typical number of pairs (the most seeds of any row)."""
        return max((row.mde for row in self.rows if row.n == self.n_seeds), default=math.nan)


@dataclass(frozen=True)
class Verdict:
    """Per-task verdicts (in the order of the summaries), the pooled rows (display order) and the
    default-method rule on the same stage-2 runs (:mod:`.default_rule`)."""

    tasks: list[TaskVerdict]
    pooled: list[Row]
    default: DefaultChoice | None = None
    machines: str = ""
    """Which machines made the runs (`machines.stage_two_machines`), shown under the tables."""


def _detectable(mde: float, n: int, level: float) -> float:
    """``mde``, or infinity where the exact sign-flip test on ``n`` differences cannot reach ``level`` at
    all (`paired.smallest_sign_flip_p`): the t-based MDE would promise power that test does not have."""
    return math.inf if n >= 2 and paired.smallest_sign_flip_p(n) > level else mde


def _collapsed(method: MethodSummary) -> tuple[int | None, int]:
    return method.n_collapsed, len(method.seeds)


def _task_verdict(summary: TaskSummary) -> TaskVerdict:
    compared = [m for m in summary.methods if m.comparison is not None and len(m.comparison.seeds) >= 1]
    sds = [float(np.std(m.comparison.differences, ddof=1)) for m in compared
           if m.comparison is not None and len(m.comparison.seeds) >= 2]
    spread = float(np.median(sds)) if sds else math.nan
    level = ALPHA / max(len(compared), 1)
    rows = []
    for m in compared:
        assert m.comparison is not None
        d = np.asarray(m.comparison.differences, dtype=float)
        low, high = paired.mean_interval(d)
        mean = float(d.mean())
        scale = spread if math.isfinite(spread) and spread > 0 else math.nan
        mde = _detectable(paired.minimum_detectable_effect(spread, d.size, level, POWER)
                          if math.isfinite(spread) else math.nan, d.size, level)
        n_collapsed, n_runs = _collapsed(m)
        rows.append(Row(
            method=m.method, task=summary.label, n=int(d.size), mean=mean, low=low, high=high,
            standardized=mean / scale, standardized_low=low / scale, standardized_high=high / scale,
            p_sign_flip=paired.sign_flip_p_sampled(d), p_holm=math.nan,
            wins=m.comparison.wins, ties=m.comparison.ties, losses=m.comparison.losses, mde=mde,
            n_collapsed=n_collapsed, n_runs=n_runs, differences=tuple(float(x) for x in d),
            seeds=tuple(m.comparison.seeds),
        ))
    adjusted = paired.holm([row.p_sign_flip for row in rows])
    rows = [replace(row, p_holm=p) for row, p in zip(rows, adjusted, strict=True)]
    baseline = summary.method(summary.best_baseline) if summary.best_baseline else None
    collapsed, runs = _collapsed(baseline) if baseline else (None, 0)
    return TaskVerdict(label=summary.label, task=summary.task, metric_name=summary.metric_name,
                       baseline=summary.best_baseline, baseline_collapsed=collapsed, baseline_runs=runs, spread=spread,
                       n_seeds=max((row.n for row in rows), default=0), rows=rows)


def task_contribution(regimes: Sequence[tuple[Row, float]]) -> np.ndarray:
    """One task's standardized differences, one per evaluation seed (ascending), from its regimes'
    rows and spreads: at each seed the mean of ``difference / spread`` over the regimes that ran it.

    Regimes of one task share its test set and evaluation seeds, so their differences at a seed are
    not independent draws: averaging them per seed keeps one unit per seed, which the pooled sign
    flip may flip as a whole (exchangeable under the null, as each regime's pair is)."""
    by_seed: dict[int, list[float]] = {}
    for row, spread in regimes:
        for seed, difference in zip(row.seeds, row.differences, strict=True):
            by_seed.setdefault(seed, []).append(difference / spread)
    return np.array([float(np.mean(values)) for _, values in sorted(by_seed.items())], dtype=float)


def _pooled_row(method: str, tasks: Sequence[Sequence[tuple[Row, float]]], level: float) -> Row:
    """Mean over tasks of the per-task mean standardized difference, with its interval and test;
    ``tasks`` holds, per task, its regimes' rows with their spreads (`task_contribution`)."""
    rows = [row for regimes in tasks for row, _ in regimes]
    standardized = [task_contribution(regimes) for regimes in tasks]
    count = len(standardized)
    effect = float(np.mean([z.mean() for z in standardized]))
    variances = [float(z.var(ddof=1)) / z.size for z in standardized]
    standard_error = math.sqrt(sum(variances)) / count
    if standard_error > 0:
        df = sum(variances) ** 2 / sum(v * v / (z.size - 1) for v, z in zip(variances, standardized, strict=True))
        half = float(stats.t.ppf(0.975, df)) * standard_error
    else:
        half = 0.0
    weighted = np.concatenate([z / (count * z.size) for z in standardized])
    unit_error = math.sqrt(sum(1.0 / z.size for z in standardized)) / count  # the error at unit spread
    collapsed = [row.n_collapsed for row in rows]
    return Row(
        method=method, task=POOLED, n=int(sum(z.size for z in standardized)), mean=effect, low=effect - half,
        high=effect + half, standardized=effect, standardized_low=effect - half, standardized_high=effect + half,
        p_sign_flip=paired.sign_flip_p_sampled(weighted), p_holm=math.nan,
        wins=sum(row.wins for row in rows), ties=sum(row.ties for row in rows),
        losses=sum(row.losses for row in rows),
        mde=_detectable(paired.normal_minimum_detectable_effect(unit_error, level, POWER), len(weighted), level),
        n_collapsed=None if all(c is None for c in collapsed) else sum(c or 0 for c in collapsed),
        n_runs=sum(row.n_runs for row in rows), differences=tuple(float(x) for z in standardized for x in z),
    )


def verdict(summaries: Sequence[TaskSummary]) -> Verdict:
    """The verdict over the stage-2 summaries among ``summaries`` (stage-1 ones are ignored).

    A method is pooled over the regimes where it has at least 2 paired seeds and the regime's spread
    is positive, when they cover at least 2 distinct tasks (regimes of one task: `task_contribution`).
    """
    tasks = [_task_verdict(s) for s in summaries if s.stage == "eval"]
    usable: dict[str, dict[str, list[tuple[Row, float]]]] = {}
    for task in tasks:
        if not (math.isfinite(task.spread) and task.spread > 0):
            continue
        for row in task.rows:
            if row.n >= 2:
                usable.setdefault(row.method, {}).setdefault(task.task, []).append((row, task.spread))
    pooled_methods = [m for m in method_order(usable) if len(usable[m]) >= 2]
    level = ALPHA / max(len(pooled_methods), 1)
    pooled = [_pooled_row(m, list(usable[m].values()), level) for m in pooled_methods]
    adjusted = paired.holm([row.p_sign_flip for row in pooled])
    return Verdict(tasks=tasks, pooled=[replace(row, p_holm=p) for row, p in zip(pooled, adjusted, strict=True)],
                   default=choose_default(summaries))
