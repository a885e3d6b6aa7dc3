"""Paired tests: t-test p against numerical integration and closed forms, sign-flip p against enumeration."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from fisherlora.bench.paired import paired_t_test, sign_flip_p

# ----------------------------------------------------------------------------- independent references


def _t_density(x: np.ndarray, df: float) -> np.ndarray:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return np.exp(log_c) * (1.0 + x * x / df) ** (-(df + 1) / 2)


def _two_sided_p_by_integration(t: float, df: float) -> float:
    """1 - 2 * integral_0^|t| of the t density (composite Simpson, 20,001 points): independent of scipy."""
    x = np.linspace(0.0, abs(t), 20_001)
    y = _t_density(x, df)
    h = x[1] - x[0]
    integral = h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum())
    return 1.0 - 2.0 * integral


def _differences_with_t(t: float, n: int) -> np.ndarray:
    """``n`` differences whose one-sample t statistic is exactly ``t`` (zero-mean pattern, shifted)."""
    base = np.linspace(-1.0, 1.0, n)
    base = base / base.std(ddof=1)
    return base + t / math.sqrt(n)


@pytest.mark.parametrize("t, n", [(0.5, 2), (2.0, 3), (3.873, 4), (1.2, 8), (4.0, 16), (-2.2, 10)])
def test_t_p_matches_numerical_integration(t: float, n: int) -> None:
    _, p = paired_t_test(_differences_with_t(t, n))
    assert p == pytest.approx(_two_sided_p_by_integration(t, n - 1), abs=1e-9)


def test_t_p_closed_form_cauchy() -> None:
    # n = 2: df = 1 is Cauchy, P(|T| >= t) = 1 - 2 atan(t) / pi
    _, p = paired_t_test(_differences_with_t(2.0, 2))
    assert p == pytest.approx(1 - 2 * math.atan(2.0) / math.pi, rel=1e-12)
    _, p = paired_t_test([-1.0, 0.0, 1.0])
    assert p == pytest.approx(1.0)


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
        sign_flip_p(np.ones(21))


def test_sign_flip_matches_brute_force() -> None:
    d = [0.03, -0.01, 0.02, 0.05, 0.0, 0.04, -0.02]
    observed = abs(sum(d))
    hits = sum(
        abs(sum(s * x for s, x in zip(signs, d, strict=True))) >= observed - 1e-12
        for signs in itertools.product((1, -1), repeat=len(d))
    )
    assert sign_flip_p(d) == pytest.approx(hits / 2 ** len(d))


def test_sign_flip_near_ties_match_exact_arithmetic() -> None:
    # Sign patterns whose sums equal the observed one in exact arithmetic but differ from it in the
    # last bits in floating point must count as reaching it (found: 1.0 vs 0.998 for the first).
    cases = [[0.99, 0.24, 0.93, -0.38, 0.48, 0.54, -1.13, 0.3, -0.2, -1.78],
             [-1.291, -0.116, -0.516, 0.508, 0.362, -1.058, -0.076, 0.551, 0.791, 0.097, 0.738]]
    for d in cases:
        exact = [Fraction(str(x)) for x in d]
        observed = abs(sum(exact))
        hits = sum(abs(sum(s * x for s, x in zip(signs, exact, strict=True))) >= observed
                   for signs in itertools.product((1, -1), repeat=len(d)))
        assert sign_flip_p(d) == hits / 2 ** len(d)
