"""Benchmark statistics: t-test and sign-flip p-values, LR selection on validation, summaries of the fixture."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fisherlora.bench.statistics import (
    BASELINES,
    is_baseline,
    is_failed,
    mean_curve,
    method_order,
    paired_t_test,
    regularized_incomplete_beta,
    select_lr,
    sign_flip_p,
    smooth,
    steps_to_reach,
    student_t_two_sided_p,
    summarize,
)

FIXTURE = Path(__file__).parent / "fixtures" / "runs.jsonl"


# ----------------------------------------------------------------------------- independent references


def _t_density(x: np.ndarray, df: float) -> np.ndarray:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return np.exp(log_c) * (1.0 + x * x / df) ** (-(df + 1) / 2)


def _two_sided_p_by_integration(t: float, df: float) -> float:
    """1 - 2 * integral_0^|t| of the t density (composite Simpson, 20,001 points): independent of betacf."""
    x = np.linspace(0.0, abs(t), 20_001)
    y = _t_density(x, df)
    h = x[1] - x[0]
    integral = h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum())
    return 1.0 - 2.0 * integral


def _run(method: str, lr: float, seed: int, val: float, test: float, **extra: Any) -> dict[str, Any]:
    return {
        "run_id": f"t/{method}/{lr}/{seed}", "preset": "p", "task": "t", "method": method, "seed": seed, "lr": lr,
        "metric_name": "accuracy", "val_metric": val, "test_metric": test, "final_train_loss": 1.0,
        "curve": {"step": [0, 10], "train_loss": [2.0, 1.0]}, "init_seconds": 1.0, "init_peak_rss_mb": 100.0,
        "init_stats_mb": 0.0, "train_seconds": 5.0, **extra,
    }


# ----------------------------------------------------------------------------- distributions


def test_incomplete_beta_known_values() -> None:
    # I_x(1, 1) = x; I_x(a, 1) = x^a; I_0.4(2, 3) = sum_{j=2..4} C(4, j) 0.4^j 0.6^(4-j) = 0.5248
    assert regularized_incomplete_beta(1, 1, 0.3) == pytest.approx(0.3, abs=1e-14)
    assert regularized_incomplete_beta(3.5, 1, 0.7) == pytest.approx(0.7**3.5, rel=1e-12)
    assert regularized_incomplete_beta(2, 3, 0.4) == pytest.approx(0.5248, rel=1e-12)
    for a, b, x in [(0.5, 7.0, 0.2), (30.0, 0.5, 0.95), (2.5, 2.5, 0.5)]:
        assert regularized_incomplete_beta(a, b, x) == pytest.approx(1 - regularized_incomplete_beta(b, a, 1 - x))
    assert regularized_incomplete_beta(2, 2, 0.0) == 0.0 and regularized_incomplete_beta(2, 2, 1.0) == 1.0


@pytest.mark.parametrize("t, df", [(0.5, 1), (2.0, 2), (3.873, 3), (1.2, 7), (4.0, 15), (-2.2, 9)])
def test_t_p_matches_numerical_integration(t: float, df: int) -> None:
    assert student_t_two_sided_p(t, df) == pytest.approx(_two_sided_p_by_integration(t, df), abs=1e-9)


def test_t_p_closed_forms() -> None:
    # df = 1 is Cauchy: P(|T| >= t) = 1 - 2 atan(t) / pi
    assert student_t_two_sided_p(2.0, 1) == pytest.approx(1 - 2 * math.atan(2.0) / math.pi, rel=1e-12)
    assert student_t_two_sided_p(0.0, 5) == pytest.approx(1.0)
    assert student_t_two_sided_p(math.inf, 5) == 0.0


# ----------------------------------------------------------------------------- paired tests


def test_paired_t_test_hand_computation() -> None:
    # d = [1, 2, 3, 4]: mean 2.5, sd = sqrt(5/3) = 1.2910, t = 2.5 / (1.2910 / 2) = 3.873, df = 3
    mean, p = paired_t_test([1.0, 2.0, 3.0, 4.0])
    t = 2.5 / (math.sqrt(5 / 3) / 2)
    assert mean == 2.5
    assert t == pytest.approx(3.873, abs=1e-3)
    x = t / math.sqrt(3)  # closed form of the t CDF with 3 degrees of freedom
    p_closed = 1 - 2 * (x / (1 + x * x) + math.atan(x)) / math.pi
    assert p == pytest.approx(p_closed, rel=1e-10)
    assert p == pytest.approx(_two_sided_p_by_integration(t, 3), abs=1e-9)
    assert p == pytest.approx(0.0305, abs=1e-4)


def test_paired_t_test_degenerate_cases() -> None:
    assert all(math.isnan(v) for v in paired_t_test([]))
    mean, p = paired_t_test([0.7])
    assert mean == 0.7 and math.isnan(p)
    mean, p = paired_t_test([0.0, 0.0, 0.0])
    assert mean == 0.0 and math.isnan(p)
    assert paired_t_test([0.25, 0.25]) == (0.25, 0.0)
    with pytest.raises(ValueError, match="finite"):
        paired_t_test([1.0, math.nan])


def test_paired_t_test_is_sign_symmetric() -> None:
    d = np.array([0.3, -0.1, 0.5, 0.2, 0.05])
    mean_pos, p_pos = paired_t_test(d)
    mean_neg, p_neg = paired_t_test(-d)
    assert mean_neg == pytest.approx(-mean_pos) and p_neg == pytest.approx(p_pos)


def test_sign_flip_small_cases() -> None:
    assert sign_flip_p([1.0, 2.0, 3.0]) == 0.25  # only the all-+ and all-- patterns reach |sum| = 6
    assert sign_flip_p([-1.0, -2.0, -3.0]) == 0.25
    assert sign_flip_p([0.0, 0.0]) == 1.0
    assert sign_flip_p([1.0, -1.0]) == 1.0
    assert math.isnan(sign_flip_p([]))
    with pytest.raises(ValueError, match="2\\*\\*n"):
        sign_flip_p(np.ones(17))


def test_sign_flip_matches_brute_force() -> None:
    d = [0.03, -0.01, 0.02, 0.05, 0.0, 0.04, -0.02]
    observed = abs(sum(d))
    hits = sum(
        abs(sum(s * x for s, x in zip(signs, d, strict=True))) >= observed - 1e-12
        for signs in itertools.product((1, -1), repeat=len(d))
    )
    assert sign_flip_p(d) == pytest.approx(hits / 2 ** len(d))


# ----------------------------------------------------------------------------- method names, LR selection


def test_is_baseline() -> None:
    for name in ("lora", "gaussian", "pissa", "olora", "eva", "corda", "lora_ga", "milora"):
        assert is_baseline(name)
    for name in ("fisher_svd", "fisher_svd@true", "fisher_grad", "LoRA"):
        assert not is_baseline(name)
    order = method_order(["fisher_svd", "pissa", "fisher_grad", "lora"])
    assert order == ["lora", "pissa", "fisher_grad", "fisher_svd"]
    assert len(BASELINES) == 8


def test_select_lr_uses_validation_not_test() -> None:
    # lr 1e-3: best validation, worse test; lr 3e-4: worse validation, best test. Validation must win.
    runs = [
        _run("lora", 3e-4, s, val=0.70, test=0.90) for s in range(3)
    ] + [
        _run("lora", 1e-3, s, val=0.80, test=0.60) for s in range(3)
    ] + [
        _run("lora", 3e-3, s, val=0.75, test=0.85) for s in range(3)
    ]
    selection = select_lr(runs)
    assert selection.lr == 1e-3
    assert not selection.at_edge and selection.swept
    assert selection.grid == (3e-4, 1e-3, 3e-3)
    assert selection.val_mean_by_lr[3e-4] == pytest.approx(0.70)


def test_select_lr_averages_over_seeds() -> None:
    # lr A has the single best seed but the lower mean
    runs = [_run("m", 1e-4, 0, 0.95, 0.0), _run("m", 1e-4, 1, 0.50, 0.0),
            _run("m", 1e-3, 0, 0.80, 0.0), _run("m", 1e-3, 1, 0.80, 0.0)]
    assert select_lr(runs).lr == 1e-3


def test_select_lr_ignores_lrs_tried_on_fewer_seeds() -> None:
    # 1e-4 was tried on seed 0 only (then dropped from the grid): its single high value must not win,
    # and the edge is judged on the LRs tried on every seed.
    runs = [_run("m", 1e-4, 0, 0.99, 0.0)] + [
        _run("m", lr, s, val, 0.0) for s in range(3) for lr, val in ((1e-3, 0.5), (3e-3, 0.7), (1e-2, 0.6))
    ]
    selection = select_lr(runs)
    assert selection.lr == 3e-3 and not selection.at_edge and selection.grid == (1e-4, 1e-3, 3e-3, 1e-2)
    lowest = [_run("m", 1e-4, 0, 0.1, 0.0)] + [_run("m", lr, s, val, 0.0) for s in range(2)
                                                 for lr, val in ((1e-3, 0.8), (3e-3, 0.7))]
    assert select_lr(lowest).lr == 1e-3 and select_lr(lowest).at_edge


def test_select_lr_edges_ties_and_failures() -> None:
    low = [_run("m", 1e-4, 0, 0.9, 0.0), _run("m", 1e-3, 0, 0.5, 0.0), _run("m", 1e-2, 0, 0.4, 0.0)]
    assert select_lr(low).lr == 1e-4 and select_lr(low).at_edge
    high = [_run("m", 1e-4, 0, 0.1, 0.0), _run("m", 1e-3, 0, 0.5, 0.0), _run("m", 1e-2, 0, 0.6, 0.0)]
    assert select_lr(high).lr == 1e-2 and select_lr(high).at_edge
    tie = [_run("m", 1e-3, 0, 0.5, 0.0), _run("m", 1e-4, 0, 0.5, 0.0), _run("m", 1e-2, 0, 0.1, 0.0)]
    assert select_lr(tie).lr == 1e-4  # exact tie -> smaller LR
    single = select_lr([_run("m", 1e-3, 0, 0.5, 0.0)])
    assert single.lr == 1e-3 and not single.at_edge and not single.swept
    # the largest LR failed everywhere: it stays in the grid (it was tried), so 1e-3 is not an edge
    failed = [_run("m", 1e-4, 0, 0.1, 0.0), _run("m", 1e-3, 0, 0.5, 0.0),
              _run("m", 1e-2, 0, math.nan, math.nan, error="diverged")]
    assert select_lr(failed).lr == 1e-3 and not select_lr(failed).at_edge
    with pytest.raises(ValueError, match="single method"):
        select_lr([_run("a", 1e-3, 0, 0.5, 0.0), _run("b", 1e-3, 0, 0.5, 0.0)])
    with pytest.raises(ValueError, match="no successful run"):
        select_lr([_run("m", 1e-3, 0, math.nan, math.nan, error="boom")])


def test_is_failed() -> None:
    assert not is_failed(_run("m", 1e-3, 0, 0.5, 0.5))
    assert is_failed(_run("m", 1e-3, 0, 0.5, 0.5, error="OOM"))
    assert is_failed(_run("m", 1e-3, 0, 0.5, math.nan))
    assert is_failed({**_run("m", 1e-3, 0, 0.5, 0.5), "val_metric": None})


# ----------------------------------------------------------------------------- curves


def test_steps_to_reach() -> None:
    steps, losses = [0, 10, 20, 30], [2.0, 1.5, 1.0, 0.9]
    assert steps_to_reach(steps, losses, 1.0) == 20  # <= is inclusive
    assert steps_to_reach(steps, losses, 1.2) == 20
    assert steps_to_reach(steps, losses, 5.0) == 0
    assert steps_to_reach(steps, losses, 0.5) is None
    assert steps_to_reach([0, 10], [math.nan, 0.4], 0.5) == 10
    assert steps_to_reach([], [], 1.0) is None
    with pytest.raises(ValueError):
        steps_to_reach([0, 1], [1.0], 1.0)


def test_smooth_and_mean_curve() -> None:
    assert smooth([1.0, 3.0, 5.0], 1) == [1.0, 3.0, 5.0]
    assert smooth([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]
    steps, mean = mean_curve([([0, 10], [2.0, 1.0]), ([0, 10], [4.0, 3.0])])
    assert steps == [0, 10] and mean == [3.0, 2.0]
    steps, mean = mean_curve([([0, 10, 20], [2.0, 1.0, 0.0]), ([0, 5, 10], [4.0, 3.0, 2.0])])
    assert steps == [0, 10] and mean == [3.0, 1.5]
    assert mean_curve([]) == ([], [])


# ----------------------------------------------------------------------------- summaries


def _fixture_runs() -> list[dict[str, Any]]:
    return [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]


def test_summarize_fixture_text_task() -> None:
    summaries = {s.task: s for s in summarize(_fixture_runs())}
    assert set(summaries) == {"rt_minilm", "arith_smollm"}
    rt = summaries["rt_minilm"]
    assert rt.preset == "smoke" and rt.metric_name == "accuracy"
    assert [m.method for m in rt.methods] == ["lora", "pissa", "fisher_svd", "fisher_svd@true"]
    assert rt.n_runs == 33 and rt.n_failed == 1 and rt.failed_runs[0].method == "fisher_svd"
    assert rt.seeds == (0, 1, 2)

    lora = rt.method("lora")  # the 3e-4 runs have the best TEST accuracy (0.80) but not the best validation
    assert lora.best_lr == pytest.approx(1e-3) and not lora.at_edge
    assert lora.test_mean == pytest.approx(0.78) and lora.test_std == pytest.approx(0.01)
    assert lora.val_mean == pytest.approx(0.78)
    assert lora.comparison is None

    pissa = rt.method("pissa")
    assert pissa.best_lr == pytest.approx(3e-4) and pissa.at_edge
    assert rt.best_baseline == "pissa"

    # LoRA's target: median of its final losses at its best LR (0.50, 0.52, 0.48) = 0.50
    assert rt.lora_target_loss == pytest.approx(0.50)
    assert lora.steps_to_lora_loss == {0: 100, 1: None, 2: 100} and lora.steps_median == 100
    assert pissa.steps_median is None and pissa.n_reached == 0

    ours = rt.method("fisher_svd")
    assert ours.n_failed == 1 and ours.n_runs == 9
    assert ours.best_lr == pytest.approx(1e-3) and ours.seeds == (0, 1, 2)
    assert ours.steps_to_lora_loss == {0: 50, 1: 50, 2: 50}
    assert ours.init_seconds_median == pytest.approx(12.1)
    assert ours.init_peak_rss_mb_median == pytest.approx(1400.0)
    assert ours.init_stats_mb_median == pytest.approx(35.0)
    c = ours.comparison
    assert c is not None and c.baseline == "pissa" and c.seeds == (0, 1, 2)
    assert c.differences == pytest.approx((0.03, 0.03, 0.0))
    assert (c.wins, c.ties, c.losses) == (2, 1, 0)
    assert c.mean_difference == pytest.approx(0.02)
    # d = [.03, .03, 0]: sd = 0.01732, t = 0.02 / (0.01732 / sqrt 3) = 2.0, df = 2 -> p = 1 - 2/sqrt(6)
    assert c.p_t_test == pytest.approx(1 - 2 / math.sqrt(6), rel=1e-9)
    assert c.p_sign_flip == pytest.approx(0.5)

    true_fisher = rt.method("fisher_svd@true")
    assert true_fisher.best_lr == pytest.approx(3e-3) and true_fisher.at_edge
    assert true_fisher.comparison is not None
    assert (true_fisher.comparison.wins, true_fisher.comparison.ties, true_fisher.comparison.losses) == (0, 1, 2)
    assert true_fisher.steps_to_lora_loss == {0: 75, 1: 100, 2: None}


def test_summarize_fixture_generation_task() -> None:
    arith = {s.task: s for s in summarize(_fixture_runs())}["arith_smollm"]
    assert arith.metric_name == "exact_match"
    assert [m.method for m in arith.methods] == ["lora", "gaussian", "fisher_grad"]
    assert arith.best_baseline == "lora"
    gaussian = arith.method("gaussian")
    assert not gaussian.swept and not gaussian.at_edge
    grad = arith.method("fisher_grad")
    assert grad.best_lr == pytest.approx(1e-4) and grad.at_edge
    assert grad.n_failed == 1 and arith.n_failed == 1
    assert grad.comparison is not None and grad.comparison.differences == pytest.approx((0.03, 0.07))
    assert grad.comparison.wins == 2


def test_summarize_pairs_by_seed_and_handles_missing_lora() -> None:
    runs = [
        _run("pissa", 1e-3, 0, 0.5, 0.50), _run("pissa", 1e-3, 1, 0.5, 0.60), _run("pissa", 1e-3, 2, 0.5, 0.70),
        _run("fisher_svd", 1e-3, 1, 0.5, 0.65), _run("fisher_svd", 1e-3, 2, 0.5, 0.65),
        _run("fisher_svd", 1e-3, 3, 0.5, 0.99),  # no pissa partner for seed 3
    ]
    (summary,) = summarize(runs)
    assert summary.lora_target_loss is None
    ours = summary.method("fisher_svd")
    assert ours.steps_to_lora_loss == {} and ours.steps_median is None
    assert ours.comparison is not None and ours.comparison.seeds == (1, 2)
    assert ours.comparison.differences == pytest.approx((0.05, -0.05))


def test_summarize_method_with_only_failures_and_no_baseline() -> None:
    runs = [
        _run("fisher_svd", 1e-3, 0, math.nan, math.nan, error="OOM"),
        _run("fisher_grad", 1e-3, 0, 0.5, 0.5),
        _run("fisher_grad", 1e-3, 1, 0.5, 0.7),
    ]
    (summary,) = summarize(runs)
    assert summary.best_baseline is None
    dead = summary.method("fisher_svd")
    assert dead.best_lr is None and dead.n_failed == 1 and math.isnan(dead.test_mean) and dead.comparison is None
    alive = summary.method("fisher_grad")
    assert alive.comparison is None and alive.test_mean == pytest.approx(0.6)


def test_summarize_single_seed_std_is_zero_and_duplicate_ids_keep_last() -> None:
    first = _run("lora", 1e-3, 0, 0.5, 0.1)
    rerun = {**first, "test_metric": 0.4}
    (summary,) = summarize([first, rerun])
    lora = summary.method("lora")
    assert lora.test_std == 0.0 and lora.test_mean == pytest.approx(0.4) and lora.n_runs == 1


def test_summarize_separates_presets() -> None:
    runs = [_run("lora", 1e-3, 0, 0.5, 0.5), {**_run("lora", 1e-3, 0, 0.5, 0.9), "preset": "full", "run_id": "x"}]
    summaries = summarize(runs)
    assert [(s.preset, s.task) for s in summaries] == [("full", "t"), ("p", "t")]
