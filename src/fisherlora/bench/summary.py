"""Per-method and per-task summaries of the run records: the numbers behind every table.

Pure functions of the run records; nothing reads files or draws. Protocol encoded here:

- each method at its validation-selected learning rate (:func:`.selection.select_lr`); the test
  metric is only ever read at that LR;
- each Fisher variant ("ours": every method that is not a baseline, :mod:`.roles`) and each paper
  baseline is compared with the best baseline (highest mean validation metric at its own best LR),
  paired by seed: mean difference, paired t-test, exact sign-flip test, wins / ties / losses
  (:mod:`.paired`);
- convergence: steps each seed needs to reach vanilla LoRA's final training loss;
- failed runs (an ``"error"`` entry or a non-finite metric) are counted and listed, never averaged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from .curves import mean_curve, run_curve, smooth, steps_to_reach
from .paired import MAX_EXACT_SIGN_FLIP_N, paired_t_test, sign_flip_p
from .roles import is_baseline, is_compared, method_order
from .selection import Run, Stage, dedupe, is_collapsed, is_failed, median, number, per_seed, select_lr, stage_of

REFERENCE_METHOD = "lora"
"""Vanilla LoRA: its final training loss is the convergence target."""


@dataclass(frozen=True)
class Comparison:
    """One Fisher variant against the best baseline, paired by seed (differences are ours - baseline)."""

    baseline: str
    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    mean_difference: float
    p_t_test: float
    p_sign_flip: float
    wins: int
    ties: int
    losses: int


@dataclass(frozen=True)
class FailedRun:
    """A run excluded from every mean, with the reason it carries."""

    run_id: str
    method: str
    lr: float
    seed: int
    error: str


@dataclass(frozen=True)
class MethodSummary:
    """One method on one task, at its validation-selected learning rate.

    ``test_*``/``val_mean``/``seeds``/``mean_curve_*`` use the successful runs at ``best_lr``; the
    cost medians use every run of the method whose field is finite (initialization and training
    cost do not depend on the LR). ``steps_to_lora_loss`` maps each seed at ``best_lr`` to the first
    step reaching the LoRA target (None: never reached); ``steps_median`` counts never as +inf and
    is None if that median is infinite or there is no target. ``best_lr`` is None when every run of
    the method failed. ``n_collapsed``: successful runs at ``best_lr`` whose test predictions
    collapsed to one class (:func:`.selection.is_collapsed`; they stay in every mean), None when
    no such run records its predictions.
    """

    method: str
    is_baseline: bool
    best_lr: float | None
    lr_grid: tuple[float, ...]
    at_edge: bool
    seeds: tuple[int, ...]
    test_mean: float
    test_std: float
    val_mean: float
    init_seconds_median: float
    init_peak_rss_mb_median: float
    init_stats_mb_median: float
    train_seconds_median: float
    steps_to_lora_loss: dict[int, int | None]
    steps_median: float | None
    n_runs: int
    n_failed: int
    mean_curve_steps: tuple[int, ...] = ()
    mean_curve_loss: tuple[float, ...] = ()
    comparison: Comparison | None = None
    n_collapsed: int | None = None

    @property
    def swept(self) -> bool:
        """Whether more than one LR was tried."""
        return len(self.lr_grid) >= 2

    @property
    def n_reached(self) -> int:
        """Seeds whose curve reached the LoRA target."""
        return sum(v is not None for v in self.steps_to_lora_loss.values())


@dataclass(frozen=True)
class TaskSummary:
    """Every method on one (preset, task, stage): the rows of one table.

    In stage ``"tune"`` each method sits at its validation-selected LR and ``best_baseline`` is the
    baseline with the best mean test metric. In stage ``"eval"`` each method sits at the LR stage 1
    selected (``"tune"`` runs of the same preset and task) and ``best_baseline`` is the baseline with
    the best stage-1 mean validation metric (never a test metric): the comparison it anchors is
    decided before stage 2 is seen.
    """

    preset: str
    task: str
    metric_name: str
    methods: list[MethodSummary]
    best_baseline: str | None
    lora_target_loss: float | None
    failed_runs: list[FailedRun] = field(default_factory=list)
    n_runs: int = 0
    stage: Stage = "tune"

    @property
    def label(self) -> str:
        """``text`` for preset ``text`` of task ``text``; ``text-long/text`` when the preset, a regime
        of the task (e.g. longer training), says more."""
        return self.task if self.preset in ("", self.task) else f"{self.preset}/{self.task}"

    @property
    def n_failed(self) -> int:
        """Failed runs on this task, all methods together."""
        return len(self.failed_runs)

    @property
    def seeds(self) -> tuple[int, ...]:
        """Every seed behind at least one cell."""
        return tuple(sorted({s for m in self.methods for s in m.seeds}))

    def method(self, name: str) -> MethodSummary:
        """The row of ``name``; ``KeyError`` if absent."""
        for summary in self.methods:
            if summary.method == name:
                return summary
        raise KeyError(name)


def _compare(ours: Mapping[int, float], baseline: Mapping[int, float], baseline_name: str) -> Comparison:
    """Paired comparison over the seeds both sides have."""
    seeds = tuple(sorted(set(ours) & set(baseline)))
    diffs = np.asarray([ours[s] - baseline[s] for s in seeds], dtype=float)
    mean, p_t = paired_t_test(diffs)
    p_sign = sign_flip_p(diffs) if diffs.size <= MAX_EXACT_SIGN_FLIP_N else math.nan
    return Comparison(
        baseline=baseline_name,
        seeds=seeds,
        differences=tuple(float(x) for x in diffs),
        mean_difference=mean,
        p_t_test=p_t,
        p_sign_flip=p_sign,
        wins=int(np.count_nonzero(diffs > 0)),
        ties=int(np.count_nonzero(diffs == 0)),
        losses=int(np.count_nonzero(diffs < 0)),
    )


def _steps_for_runs(runs: Sequence[Run], target: float | None, smooth_window: int) -> dict[int, int | None]:
    """Per seed (successful runs), the first step at which the smoothed curve reaches ``target``."""
    if target is None:
        return {}
    out: dict[int, int | None] = {}
    for run in sorted(runs, key=lambda r: int(r["seed"])):
        if is_failed(run):
            continue
        steps, losses = run_curve(run)
        out[int(run["seed"])] = steps_to_reach(steps, smooth(losses, smooth_window), target)
    return out


def _steps_median(steps: Mapping[int, int | None]) -> float | None:
    """Median steps with 'never reached' as +inf; None when empty or the median is infinite."""
    if not steps:
        return None
    values = [math.inf if v is None else float(v) for v in steps.values()]
    median = float(np.median(values))
    return median if math.isfinite(median) else None


def _summarize_method(method: str, runs: Sequence[Run], target: float | None, smooth_window: int,
                      fixed_lr: float | None = None) -> MethodSummary:
    """Summary row of one method on one task (without the comparison, added afterwards).

    ``fixed_lr``: the LR chosen elsewhere (stage 1), used when some of ``runs`` have it; otherwise
    the LR is chosen on these runs' validation metric.
    """
    grid = tuple(sorted({float(run["lr"]) for run in runs}))
    n_failed = sum(is_failed(run) for run in runs)
    costs = {
        key: median(number(run, key) for run in runs)
        for key in ("init_seconds", "init_peak_rss_mb", "init_stats_mb", "train_seconds")
    }
    empty = MethodSummary(
        method=method, is_baseline=is_baseline(method), best_lr=None, lr_grid=grid, at_edge=False, seeds=(),
        test_mean=math.nan, test_std=math.nan, val_mean=math.nan,
        init_seconds_median=costs["init_seconds"], init_peak_rss_mb_median=costs["init_peak_rss_mb"],
        init_stats_mb_median=costs["init_stats_mb"], train_seconds_median=costs["train_seconds"],
        steps_to_lora_loss={}, steps_median=None, n_runs=len(runs), n_failed=n_failed,
    )
    if n_failed == len(runs):
        return empty
    selection = select_lr(runs)
    if fixed_lr is not None and any(float(run["lr"]) == fixed_lr and not is_failed(run) for run in runs):
        selection = replace(selection, lr=fixed_lr, at_edge=False)
    at_lr = [run for run in runs if float(run["lr"]) == selection.lr]
    collapsed = [is_collapsed(run) for run in at_lr if not is_failed(run)]
    test = per_seed(at_lr, "test_metric")
    val = per_seed(at_lr, "val_metric")
    test_values = np.asarray(list(test.values()), dtype=float)
    steps = _steps_for_runs(at_lr, target, smooth_window)
    curve_steps, curve_loss = mean_curve([run_curve(run) for run in at_lr if not is_failed(run)])
    return replace(
        empty,
        best_lr=selection.lr,
        at_edge=selection.at_edge,
        seeds=tuple(test),
        test_mean=float(test_values.mean()),
        test_std=float(test_values.std(ddof=1)) if test_values.size > 1 else 0.0,
        val_mean=float(np.mean(list(val.values()))),
        steps_to_lora_loss=steps,
        steps_median=_steps_median(steps),
        mean_curve_steps=tuple(curve_steps),
        mean_curve_loss=tuple(curve_loss),
        n_collapsed=sum(bool(c) for c in collapsed) if any(c is not None for c in collapsed) else None,
    )


def _lora_target(runs: Sequence[Run]) -> float | None:
    """Median over seeds of vanilla LoRA's final training loss at LoRA's best LR (None if unavailable)."""
    lora_runs = [run for run in runs if run["method"] == REFERENCE_METHOD]
    if not lora_runs or all(is_failed(run) for run in lora_runs):
        return None
    lr = select_lr(lora_runs).lr
    finals = per_seed([run for run in lora_runs if float(run["lr"]) == lr], "final_train_loss")
    target = median(finals.values())
    return target if math.isfinite(target) else None


def _best_baseline(methods: Sequence[MethodSummary]) -> MethodSummary | None:
    """Baseline with the highest mean validation metric at its own best LR (first in display order on
    ties), among those with a test result: the reference is chosen as stage 2 chooses it, never on the
    test metric it is then compared on (the best of several test means is biased upward)."""
    candidates = [m for m in methods if m.is_baseline and m.best_lr is not None and math.isfinite(m.test_mean)
                  and math.isfinite(m.val_mean)]
    if not candidates:
        return None
    return max(candidates, key=lambda m: m.val_mean)  # max keeps the first of equal maxima


def _failed_runs(runs: Iterable[Run]) -> list[FailedRun]:
    """The failed runs, in file order, with their reason."""
    return [
        FailedRun(
            run_id=str(run.get("run_id", "?")),
            method=str(run["method"]),
            lr=float(run["lr"]),
            seed=int(run["seed"]),
            error=str(run.get("error") or "non-finite metric"),
        )
        for run in runs
        if is_failed(run)
    ]


def _best_on_validation(tune: TaskSummary | None) -> str | None:
    """The baseline with the highest stage-1 mean validation metric at its own LR (None without one)."""
    if tune is None:
        return None
    candidates = [m for m in tune.methods if m.is_baseline and m.best_lr is not None and math.isfinite(m.val_mean)]
    return max(candidates, key=lambda m: m.val_mean).method if candidates else None


def _summarize_task(preset: str, task: str, runs: Sequence[Run], smooth_window: int,
                    tune: TaskSummary | None = None) -> TaskSummary:
    """One table: every method of one (preset, task, stage). ``tune`` given: the runs are stage 2 and
    take their LRs and best baseline from that stage-1 summary."""
    metric_names = {str(run.get("metric_name", "metric")) for run in runs}
    target = _lora_target(runs)
    by_method: dict[str, list[Run]] = {}
    for run in runs:
        by_method.setdefault(str(run["method"]), []).append(run)
    stage1_lrs = {m.method: m.best_lr for m in tune.methods} if tune is not None else {}
    methods = [_summarize_method(m, by_method[m], target, smooth_window, stage1_lrs.get(m))
               for m in method_order(by_method)]
    if tune is None:
        best = _best_baseline(methods)
    else:
        validation_best = _best_on_validation(tune)
        best = next((m for m in methods if m.method == validation_best and m.best_lr is not None), None)
    if best is not None:
        best_test = per_seed([r for r in by_method[best.method] if float(r["lr"]) == best.best_lr], "test_metric")
        methods = [
            _with_comparison(m, by_method[m.method], best_test, best.method)
            if is_compared(m.method) and m.method != best.method and m.best_lr is not None
            else m
            for m in methods
        ]
    return TaskSummary(
        preset=preset,
        task=task,
        metric_name="/".join(sorted(metric_names)),
        methods=methods,
        best_baseline=best.method if best else None,
        lora_target_loss=target,
        failed_runs=_failed_runs(runs),
        n_runs=len(runs),
        stage="tune" if tune is None else "eval",
    )


def _with_comparison(
    summary: MethodSummary, runs: Sequence[Run], baseline_test: Mapping[int, float], baseline: str
) -> MethodSummary:
    """``summary`` with its paired comparison against the best baseline filled in."""
    ours = per_seed([r for r in runs if float(r["lr"]) == summary.best_lr], "test_metric")
    return replace(summary, comparison=_compare(ours, baseline_test, baseline))


def summarize(runs: Iterable[Run], smooth_window: int = 1) -> list[TaskSummary]:
    """Summaries of every (preset, task, stage) in ``runs``, sorted by (preset, task), stage 1 first.

    Repeated ``run_id``s keep the last line; a record without ``"stage"`` is stage ``"tune"``.
    Stage-2 (``"eval"``) summaries take each method's LR and the best baseline from the stage-1
    runs of the same (preset, task) (:class:`TaskSummary`). ``smooth_window`` (default 1: curves
    are used as logged) applies a trailing moving average to each training-loss curve before
    measuring steps to reach vanilla LoRA's final loss. See :class:`MethodSummary` for what each
    number is computed from.
    """
    by_task: dict[tuple[str, str, Stage], list[Run]] = {}
    for run in dedupe(runs):
        by_task.setdefault((str(run.get("preset", "")), str(run["task"]), stage_of(run)), []).append(run)
    summaries: list[TaskSummary] = []
    for preset, task in sorted({(preset, task) for preset, task, _ in by_task}):
        tune_runs, eval_runs = by_task.get((preset, task, "tune")), by_task.get((preset, task, "eval"))
        tune = _summarize_task(preset, task, tune_runs, smooth_window) if tune_runs else None
        summaries += [tune] if tune is not None else []
        if eval_runs:
            empty_tune = TaskSummary(preset, task, "", [], None, None)
            summaries.append(_summarize_task(preset, task, eval_runs, smooth_window, tune or empty_tune))
    return summaries


def rank_of(values: Mapping[str, float]) -> dict[str, float]:
    """Rank of each key by value, 1 = highest; tied values share their mean rank.

    ``{"a": 0.9, "b": 0.7, "c": 0.9}`` -> ``{"a": 1.5, "c": 1.5, "b": 3.0}``.
    """
    ordered = sorted(values.values(), reverse=True)
    ranks: dict[str, float] = {}
    for key, value in values.items():
        positions = [i + 1 for i, v in enumerate(ordered) if v == value]
        ranks[key] = sum(positions) / len(positions)
    return ranks
