"""Run records and the learning-rate choice on validation.

A run record is one JSON object of ``runs.jsonl`` (see :mod:`.runner` for its fields). Protocol
encoded here: a method's learning rate is chosen per (preset, task) on the mean *validation*
metric over seeds, the test metric is never read for it, and a best LR at either end of the grid
is flagged (the grid must bracket the optimum). Failed runs (an ``"error"`` entry or a non-finite
metric) never enter a mean.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np

Run = Mapping[str, Any]

Stage = Literal["tune", "eval"]
"""Benchmark stage of a run: ``"tune"`` picks each method's learning rate on validation (stage 1),
``"eval"`` runs each method at that LR on fresh seeds and larger test sets for the verdict (stage 2)."""
STAGES: tuple[Stage, ...] = ("tune", "eval")


def number(run: Run, key: str) -> float:
    """``run[key]`` as a float; missing or ``None`` becomes NaN."""
    value = run.get(key)
    return math.nan if value is None else float(value)


def stage_of(run: Run) -> Stage:
    """The run's stage; a record without ``"stage"`` (written before stages existed) is ``"tune"``.

    Raises ``ValueError`` naming the run id for any other value.
    """
    stage = run.get("stage", "tune")
    if stage not in STAGES:
        raise ValueError(f"run {run.get('run_id', '?')!r}: stage must be one of {list(STAGES)}, got {stage!r}")
    return cast(Stage, stage)


COLLAPSE_FRACTION = 0.99
"""A run whose most frequent predicted test class takes at least this share of the test set collapsed."""


def is_collapsed(run: Run) -> bool | None:
    """Whether the run's test predictions collapsed to one class (``test_predicted_majority_fraction``
    >= :data:`COLLAPSE_FRACTION`); None when the record has no such field (a generation task, or a
    run recorded before the field existed)."""
    fraction = run.get("test_predicted_majority_fraction")
    return None if fraction is None else float(fraction) >= COLLAPSE_FRACTION


def is_failed(run: Run) -> bool:
    """A run failed if it carries a non-empty ``"error"`` or a non-finite validation / test metric."""
    if run.get("error"):
        return True
    return not (math.isfinite(number(run, "val_metric")) and math.isfinite(number(run, "test_metric")))


def median(values: Iterable[float]) -> float:
    """Median of the finite values; NaN when there are none."""
    arr = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    return float(np.median(arr)) if arr.size else math.nan


def per_seed(runs: Iterable[Run], key: str) -> dict[int, float]:
    """``{seed: value}`` over successful runs, sorted by seed; duplicates of one seed are averaged."""
    collected: dict[int, list[float]] = {}
    for run in runs:
        if not is_failed(run):
            collected.setdefault(int(run["seed"]), []).append(number(run, key))
    return {seed: float(np.mean(vals)) for seed, vals in sorted(collected.items())}


def dedupe(runs: Iterable[Run]) -> list[Run]:
    """Drop repeated ``run_id``s, keeping the last occurrence (a re-run overrides an older line), in file order."""
    listed = list(runs)
    last = {str(run["run_id"]): i for i, run in enumerate(listed) if run.get("run_id") is not None}
    return [run for i, run in enumerate(listed) if run.get("run_id") is None or last[str(run["run_id"])] == i]


@dataclass(frozen=True)
class LRSelection:
    """The learning rate chosen for one (task, method) on validation, and how trustworthy the grid is.

    ``at_edge`` is True when the grid has >= 2 values and ``lr`` is its smallest or largest value
    (the grid does not bracket the optimum and should be extended). With a single LR there is no
    sweep: ``swept`` is False and ``at_edge`` is False.
    """

    lr: float
    at_edge: bool
    grid: tuple[float, ...]
    val_mean_by_lr: dict[float, float]
    partial: tuple[float, ...] = ()
    """LRs of the grid tried on fewer seeds than the best-covered one: not choosable, not edges."""

    @property
    def swept(self) -> bool:
        """Whether more than one LR was tried."""
        return len(self.grid) >= 2


def _single_value(runs: Sequence[Run], key: str) -> str:
    """The one value of ``key`` shared by all runs; ``ValueError`` otherwise."""
    values = {str(run[key]) for run in runs}
    if len(values) != 1:
        raise ValueError(f"expected runs of a single {key}, got {sorted(values)}")
    return values.pop()


def select_lr(runs: Sequence[Run]) -> LRSelection:
    """Best learning rate of one (task, method) by mean validation metric over seeds.

    Runs are grouped by ``lr``; each group's ``val_metric`` is averaged over its successful runs
    (failed runs are ignored; an LR whose runs all failed cannot be chosen, but stays in the grid,
    since it was tried). Highest mean wins; exact ties go to the smaller LR. The test metric is
    never read. An LR tried on fewer seeds than the method's best-covered LR (a grid value that
    was dropped after the first seed) cannot be chosen either: its mean would be over other seeds;
    ``at_edge`` is judged on the LRs that can be chosen. Raises ``ValueError`` if the runs mix
    tasks or methods, or none succeeded.
    """
    if not runs:
        raise ValueError("select_lr needs at least one run")
    _single_value(runs, "task")
    method = _single_value(runs, "method")
    grid = tuple(sorted({float(run["lr"]) for run in runs}))
    seeds_by_lr = {lr: {run.get("seed") for run in runs if float(run["lr"]) == lr} for lr in grid}
    full_coverage = max(len(seeds) for seeds in seeds_by_lr.values())
    eligible = tuple(lr for lr in grid if len(seeds_by_lr[lr]) == full_coverage)
    val_mean_by_lr: dict[float, float] = {}
    for lr in grid:
        vals = [number(run, "val_metric") for run in runs if float(run["lr"]) == lr and not is_failed(run)]
        if vals:
            val_mean_by_lr[lr] = float(np.mean(vals))
    choosable = [lr for lr in eligible if lr in val_mean_by_lr]
    if not choosable:
        raise ValueError(f"no successful run of {method!r} to select a learning rate from")
    best = max(choosable, key=lambda lr: (val_mean_by_lr[lr], -lr))
    at_edge = len(eligible) >= 2 and best in (eligible[0], eligible[-1])
    partial = tuple(lr for lr in grid if lr not in eligible)
    return LRSelection(lr=best, at_edge=at_edge, grid=grid, val_mean_by_lr=val_mean_by_lr, partial=partial)
