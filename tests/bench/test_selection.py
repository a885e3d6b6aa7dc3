"""Method roles, LR selection on validation, failed runs, and loss curves."""

from __future__ import annotations

import math

import pytest

from fisherlora.bench.curves import mean_curve, smooth, steps_to_reach
from fisherlora.bench.roles import baselines, is_baseline, method_order
from fisherlora.bench.selection import is_failed, select_lr

from .records import make_run as _run


def test_is_baseline() -> None:
    for name in ("lora", "gaussian", "pissa", "olora", "eva", "corda", "lora_ga", "milora"):
        assert is_baseline(name)
    for name in ("fisher_svd", "fisher_svd@true", "fisher_grad", "LoRA"):
        assert not is_baseline(name)
    order = method_order(["fisher_svd", "pissa", "fisher_grad", "lora"])
    assert order == ["lora", "pissa", "fisher_grad", "fisher_svd"]
    assert len(baselines()) >= 8


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
