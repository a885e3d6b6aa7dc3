"""Training-loss curves: smoothing, averaging over seeds, and the step at which a target is reached."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .selection import Run


def steps_to_reach(curve_steps: Sequence[int], curve_losses: Sequence[float], target_loss: float) -> int | None:
    """First step at which the (already smoothed) loss curve is ``<= target_loss``; None if never.

    NaN losses never count as reached. Raises ``ValueError`` if the two sequences differ in length.
    """
    if len(curve_steps) != len(curve_losses):
        raise ValueError(f"curve has {len(curve_steps)} steps but {len(curve_losses)} losses")
    for step, loss in zip(curve_steps, curve_losses, strict=True):
        if loss is not None and float(loss) <= target_loss:
            return int(step)
    return None


def smooth(losses: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points (causal, so "reached at step s" uses data up to s).

    ``window <= 1`` returns the losses unchanged (as floats).
    """
    values = np.asarray(losses, dtype=float)
    if window <= 1 or values.size == 0:
        return values.tolist()
    cumsum = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(1, values.size + 1)
    start = np.maximum(idx - window, 0)
    return ((cumsum[idx] - cumsum[start]) / (idx - start)).tolist()


def mean_curve(curves: Sequence[tuple[Sequence[int], Sequence[float]]]) -> tuple[list[int], list[float]]:
    """Pointwise mean of several ``(steps, losses)`` curves.

    Identical step grids are averaged directly; otherwise every curve is linearly interpolated onto
    the steps of the first curve that lie inside all curves' common range. No curves -> empty lists.
    """
    usable = [(np.asarray(s, dtype=float), np.asarray(v, dtype=float)) for s, v in curves if len(s)]
    if not usable:
        return [], []
    ref_steps = usable[0][0]
    if all(s.shape == ref_steps.shape and np.array_equal(s, ref_steps) for s, _ in usable):
        return [int(x) for x in ref_steps], np.mean([v for _, v in usable], axis=0).tolist()
    lo = max(float(s.min()) for s, _ in usable)
    hi = min(float(s.max()) for s, _ in usable)
    grid = ref_steps[(ref_steps >= lo) & (ref_steps <= hi)]
    stacked = [np.interp(grid, s, v) for s, v in usable]
    return [int(x) for x in grid], np.mean(stacked, axis=0).tolist()


def run_curve(run: Run) -> tuple[list[int], list[float]]:
    """``(steps, train_loss)`` of a run (empty when the run has no curve)."""
    curve = run.get("curve") or {}
    losses = [math.nan if v is None else float(v) for v in curve.get("train_loss", [])]
    return [int(s) for s in curve.get("step", [])], losses
