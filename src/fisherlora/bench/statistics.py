"""Statistics behind the benchmark tables: LR selection on validation, paired tests, summaries.

Everything here is a pure function of the run records (one dict per line of ``runs.jsonl``, see
``DESIGN.md`` section 5); nothing reads files or draws. Only numpy and the standard library are used:
the Student-t distribution is computed from the regularized incomplete beta function (continued
fraction, Numerical Recipes ``betacf``), so no scipy is needed.

Protocol encoded here:

- a method's learning rate is chosen per (preset, task) on the mean *validation* metric over seeds;
  the test metric is only ever read at the chosen LR;
- a best LR at either end of the LR grid is flagged (the grid must bracket the optimum);
- each Fisher variant ("ours": every method that is not a baseline) is compared with the best
  baseline (highest mean test metric at its own best LR), paired by seed: mean difference, paired
  t-test, exact sign-flip test, wins / ties / losses;
- convergence: steps each seed needs to reach vanilla LoRA's final training loss;
- failed runs (an ``"error"`` entry or a non-finite metric) are counted and listed, never averaged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

Run = Mapping[str, Any]

BASELINES: tuple[str, ...] = ("lora", "gaussian", "pissa", "olora", "eva", "corda", "lora_ga", "milora")
"""Baseline methods, in the order tables list them. Every other method name is a Fisher variant (ours)."""

REFERENCE_METHOD = "lora"
"""Vanilla LoRA: its final training loss is the convergence target."""

MAX_SIGN_FLIP_N = 16
"""The exact sign-flip test enumerates 2**n sign patterns; above this it refuses."""

_BETACF_MAX_ITER = 300
_BETACF_EPS = 3e-16
_BETACF_FPMIN = 1e-300


# ----------------------------------------------------------------------------- method names


def base_method(method: str) -> str:
    """The registered name without suffixes: ``"pissa+linear"`` -> ``"pissa"``,
    ``"fisher_svd@true"`` -> ``"fisher_svd"``."""
    return method.partition("@")[0].partition("+")[0]


def is_baseline(method: str) -> bool:
    """True for the baseline initializations (:data:`BASELINES`, with any view suffix such as
    ``pissa+linear``); False for every Fisher variant of ours."""
    return base_method(method) in BASELINES


def method_order(methods: Iterable[str]) -> list[str]:
    """Stable display order: baselines in :data:`BASELINES` order (a suffixed variant right after
    its plain name), then ours sorted by name."""
    unique = set(methods)
    baselines = sorted((m for m in unique if is_baseline(m)), key=lambda m: (BASELINES.index(base_method(m)), m))
    ours = sorted(m for m in unique if not is_baseline(m))
    return baselines + ours


# ----------------------------------------------------------------------------- distributions


def _lentz_guard(value: float) -> float:
    """Keep a Lentz iterate away from zero (Numerical Recipes' FPMIN trick)."""
    return value if abs(value) >= _BETACF_FPMIN else _BETACF_FPMIN


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction for the incomplete beta function (modified Lentz, Numerical Recipes ``betacf``)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 / _lentz_guard(1.0 - qab * x / qap)
    h = d
    for m in range(1, _BETACF_MAX_ITER + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))  # even step
        d = 1.0 / _lentz_guard(1.0 + aa * d)
        c = _lentz_guard(1.0 + aa / c)
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))  # odd step
        d = 1.0 / _lentz_guard(1.0 + aa * d)
        c = _lentz_guard(1.0 + aa / c)
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _BETACF_EPS:
            return h
    raise ArithmeticError(f"betacf did not converge for a={a}, b={b}, x={x}")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function ``I_x(a, b)`` for ``a, b > 0`` and ``0 <= x <= 1``.

    Uses the continued fraction directly where it converges fast (``x < (a+1)/(a+b+2)``) and the
    symmetry ``I_x(a, b) = 1 - I_{1-x}(b, a)`` elsewhere.
    """
    if a <= 0 or b <= 0:
        raise ValueError(f"a and b must be positive, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must lie in [0, 1], got {x}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def student_t_two_sided_p(t: float, df: float) -> float:
    """Two-sided tail probability ``P(|T| >= |t|)`` of Student's t with ``df`` degrees of freedom.

    ``P(|T| >= |t|) = I_{df / (df + t^2)}(df / 2, 1 / 2)``. Infinite ``|t|`` gives 0; NaN gives NaN.
    """
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


# ----------------------------------------------------------------------------- paired tests


def _finite_array(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    """``values`` as a 1-D float array; raises ``ValueError`` on NaN / inf (drop failed pairs first)."""
    arr = np.asarray(values, dtype=float).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite; drop failed runs before testing: {arr.tolist()}")
    return arr


def paired_t_test(differences: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Paired t-test on per-seed differences (ours - baseline): returns ``(mean, p_two_sided)``.

    ``t = mean / (sd / sqrt(n))`` with the ``ddof=1`` standard deviation, ``df = n - 1``.

    Degenerate cases, chosen explicitly:

    - ``n == 0``: mean and p are NaN; ``n == 1``: the mean is the single difference, p is NaN
      (no variance estimate, the test is undefined);
    - zero variance with a zero mean (all differences 0): p is NaN (t = 0/0 is undefined; the
      sign-flip p-value, 1.0 there, is the meaningful number);
    - zero variance with a non-zero mean (every seed moved by exactly the same amount): p = 0.0,
      the limit of the test as the spread goes to 0 (``|t| -> inf``).

    Raises ``ValueError`` on non-finite differences.
    """
    d = _finite_array(differences, "differences")
    n = d.size
    if n == 0:
        return math.nan, math.nan
    mean = float(d.mean())
    if n < 2:
        return mean, math.nan
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        return mean, (math.nan if mean == 0.0 else 0.0)
    t = mean / (sd / math.sqrt(n))
    return mean, student_t_two_sided_p(t, n - 1)


def sign_flip_p(differences: Sequence[float] | np.ndarray) -> float:
    """Exact two-sided sign-flip (paired permutation) p-value of the mean difference.

    Under the null, each per-seed difference is symmetric around 0, so all ``2**n`` sign patterns are
    equally likely; p is the fraction whose ``|sum|`` is at least the observed ``|sum|`` (the observed
    pattern included, so p >= 2 / 2**n when any difference is non-zero; p = 1 when all are 0).
    ``n == 0`` gives NaN. ``n > 16`` raises ``ValueError`` (use a sampled test there).
    """
    d = _finite_array(differences, "differences")
    n = d.size
    if n == 0:
        return math.nan
    if n > MAX_SIGN_FLIP_N:
        raise ValueError(f"exact sign-flip test enumerates 2**n patterns; n={n} > {MAX_SIGN_FLIP_N}")
    patterns = np.arange(2**n, dtype=np.int64)[:, None]
    signs = 1.0 - 2.0 * ((patterns >> np.arange(n, dtype=np.int64)) & 1)
    sums = np.abs(signs @ d)
    observed = abs(float(d.sum()))
    tol = 1e-12 * max(1.0, float(np.abs(d).sum()))
    return float(np.count_nonzero(sums >= observed - tol)) / float(2**n)


# ----------------------------------------------------------------------------- run records


def _num(run: Run, key: str) -> float:
    """``run[key]`` as a float; missing or ``None`` becomes NaN."""
    value = run.get(key)
    return math.nan if value is None else float(value)


def is_failed(run: Run) -> bool:
    """A run failed if it carries a non-empty ``"error"`` or a non-finite validation / test metric."""
    if run.get("error"):
        return True
    return not (math.isfinite(_num(run, "val_metric")) and math.isfinite(_num(run, "test_metric")))


def _median(values: Iterable[float]) -> float:
    """Median of the finite values; NaN when there are none."""
    arr = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    return float(np.median(arr)) if arr.size else math.nan


def _per_seed(runs: Iterable[Run], key: str) -> dict[int, float]:
    """``{seed: value}`` over successful runs; duplicates of one seed are averaged."""
    collected: dict[int, list[float]] = {}
    for run in runs:
        if not is_failed(run):
            collected.setdefault(int(run["seed"]), []).append(_num(run, key))
    return {seed: float(np.mean(vals)) for seed, vals in sorted(collected.items())}


# ----------------------------------------------------------------------------- LR selection


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
        vals = [_num(run, "val_metric") for run in runs if float(run["lr"]) == lr and not is_failed(run)]
        if vals:
            val_mean_by_lr[lr] = float(np.mean(vals))
    choosable = [lr for lr in eligible if lr in val_mean_by_lr]
    if not choosable:
        raise ValueError(f"no successful run of {method!r} to select a learning rate from")
    best = max(choosable, key=lambda lr: (val_mean_by_lr[lr], -lr))
    at_edge = len(eligible) >= 2 and best in (eligible[0], eligible[-1])
    return LRSelection(lr=best, at_edge=at_edge, grid=grid, val_mean_by_lr=val_mean_by_lr)


# ----------------------------------------------------------------------------- curves


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


def _curve(run: Run) -> tuple[list[int], list[float]]:
    """``(steps, train_loss)`` of a run (empty when the run has no curve)."""
    curve = run.get("curve") or {}
    losses = [math.nan if v is None else float(v) for v in curve.get("train_loss", [])]
    return [int(s) for s in curve.get("step", [])], losses


# ----------------------------------------------------------------------------- summaries


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
    the method failed.
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
    """Every method on one (preset, task): the rows of one table."""

    preset: str
    task: str
    metric_name: str
    methods: list[MethodSummary]
    best_baseline: str | None
    lora_target_loss: float | None
    failed_runs: list[FailedRun] = field(default_factory=list)
    n_runs: int = 0

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


def _dedupe(runs: Iterable[Run]) -> list[Run]:
    """Drop repeated ``run_id``s, keeping the last occurrence (a re-run overrides an older line), in file order."""
    listed = list(runs)
    last = {str(run["run_id"]): i for i, run in enumerate(listed) if run.get("run_id") is not None}
    return [run for i, run in enumerate(listed) if run.get("run_id") is None or last[str(run["run_id"])] == i]


def _compare(ours: Mapping[int, float], baseline: Mapping[int, float], baseline_name: str) -> Comparison:
    """Paired comparison over the seeds both sides have."""
    seeds = tuple(sorted(set(ours) & set(baseline)))
    diffs = np.asarray([ours[s] - baseline[s] for s in seeds], dtype=float)
    mean, p_t = paired_t_test(diffs)
    p_sign = sign_flip_p(diffs) if diffs.size <= MAX_SIGN_FLIP_N else math.nan
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
        steps, losses = _curve(run)
        out[int(run["seed"])] = steps_to_reach(steps, smooth(losses, smooth_window), target)
    return out


def _steps_median(steps: Mapping[int, int | None]) -> float | None:
    """Median steps with 'never reached' as +inf; None when empty or the median is infinite."""
    if not steps:
        return None
    values = [math.inf if v is None else float(v) for v in steps.values()]
    median = float(np.median(values))
    return median if math.isfinite(median) else None


def _summarize_method(method: str, runs: Sequence[Run], target: float | None, smooth_window: int) -> MethodSummary:
    """Summary row of one method on one task (without the comparison, added afterwards)."""
    grid = tuple(sorted({float(run["lr"]) for run in runs}))
    n_failed = sum(is_failed(run) for run in runs)
    costs = {
        key: _median(_num(run, key) for run in runs)
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
    at_lr = [run for run in runs if float(run["lr"]) == selection.lr]
    test = _per_seed(at_lr, "test_metric")
    val = _per_seed(at_lr, "val_metric")
    test_values = np.asarray(list(test.values()), dtype=float)
    steps = _steps_for_runs(at_lr, target, smooth_window)
    curve_steps, curve_loss = mean_curve([_curve(run) for run in at_lr if not is_failed(run)])
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
    )


def _lora_target(runs: Sequence[Run]) -> float | None:
    """Median over seeds of vanilla LoRA's final training loss at LoRA's best LR (None if unavailable)."""
    lora_runs = [run for run in runs if run["method"] == REFERENCE_METHOD]
    if not lora_runs or all(is_failed(run) for run in lora_runs):
        return None
    lr = select_lr(lora_runs).lr
    finals = _per_seed([run for run in lora_runs if float(run["lr"]) == lr], "final_train_loss")
    target = _median(finals.values())
    return target if math.isfinite(target) else None


def _best_baseline(methods: Sequence[MethodSummary]) -> MethodSummary | None:
    """Baseline with the highest mean test metric at its own best LR (first in display order on ties)."""
    candidates = [m for m in methods if m.is_baseline and m.best_lr is not None and math.isfinite(m.test_mean)]
    if not candidates:
        return None
    return max(candidates, key=lambda m: m.test_mean)  # max keeps the first of equal maxima


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


def _summarize_task(preset: str, task: str, runs: Sequence[Run], smooth_window: int) -> TaskSummary:
    """One table: every method of one (preset, task)."""
    metric_names = {str(run.get("metric_name", "metric")) for run in runs}
    target = _lora_target(runs)
    by_method: dict[str, list[Run]] = {}
    for run in runs:
        by_method.setdefault(str(run["method"]), []).append(run)
    methods = [_summarize_method(m, by_method[m], target, smooth_window) for m in method_order(by_method)]
    best = _best_baseline(methods)
    if best is not None:
        best_test = _per_seed([r for r in by_method[best.method] if float(r["lr"]) == best.best_lr], "test_metric")
        methods = [
            _with_comparison(m, by_method[m.method], best_test, best.method)
            if not m.is_baseline and m.best_lr is not None
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
    )


def _with_comparison(
    summary: MethodSummary, runs: Sequence[Run], baseline_test: Mapping[int, float], baseline: str
) -> MethodSummary:
    """``summary`` with its paired comparison against the best baseline filled in."""
    ours = _per_seed([r for r in runs if float(r["lr"]) == summary.best_lr], "test_metric")
    return replace(summary, comparison=_compare(ours, baseline_test, baseline))


def summarize(runs: Iterable[Run], smooth_window: int = 1) -> list[TaskSummary]:
    """Summaries of every (preset, task) in ``runs``, sorted by (preset, task).

    Repeated ``run_id``s keep the last line. ``smooth_window`` (default 1: curves are used as logged)
    applies a trailing moving average to each training-loss curve before measuring steps to reach
    vanilla LoRA's final loss. See :class:`MethodSummary` for what each number is computed from.
    """
    by_task: dict[tuple[str, str], list[Run]] = {}
    for run in _dedupe(runs):
        by_task.setdefault((str(run.get("preset", "")), str(run["task"])), []).append(run)
    return [_summarize_task(preset, task, by_task[(preset, task)], smooth_window) for preset, task in sorted(by_task)]
