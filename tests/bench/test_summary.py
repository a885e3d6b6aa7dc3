"""Summaries of the fixture and of hand-made runs: LR choice, pairing by seed, comparisons, failures."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from fisherlora.bench.summary import summarize

from .records import make_run as _run

FIXTURE = Path(__file__).parent / "fixtures" / "runs.jsonl"


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
