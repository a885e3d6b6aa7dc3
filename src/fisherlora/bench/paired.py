"""Paired tests on per-seed differences (ours - baseline), computed with ``scipy.stats``.

Pure functions of arrays: nothing reads run records or files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

MAX_EXACT_SIGN_FLIP_N = 20
"""The exact sign-flip test enumerates 2**n sign patterns (about a million at 20); above this it refuses."""


def finite_array(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    """``values`` as a 1-D float array; raises ``ValueError`` on NaN / inf (drop failed pairs first)."""
    arr = np.asarray(values, dtype=float).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite; drop failed runs before testing: {arr.tolist()}")
    return arr


def paired_t_test(differences: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Paired t-test on per-seed differences (ours - baseline): returns ``(mean, p_two_sided)``.

    ``t = mean / (sd / sqrt(n))`` with the ``ddof=1`` standard deviation, ``df = n - 1``
    (``scipy.stats.ttest_1samp`` against 0).

    Degenerate cases, chosen explicitly:

    - ``n == 0``: mean and p are NaN; ``n == 1``: the mean is the single difference, p is NaN
      (no variance estimate, the test is undefined);
    - zero variance with a zero mean (all differences 0): p is NaN (t = 0/0 is undefined; the
      sign-flip p-value, 1.0 there, is the meaningful number);
    - zero variance with a non-zero mean (every seed moved by exactly the same amount): p = 0.0,
      the limit of the test as the spread goes to 0 (``|t| -> inf``).

    Raises ``ValueError`` on non-finite differences.
    """
    d = finite_array(differences, "differences")
    n = d.size
    if n == 0:
        return math.nan, math.nan
    mean = float(d.mean())
    if n < 2:
        return mean, math.nan
    if float(d.std(ddof=1)) == 0.0:
        return mean, (math.nan if mean == 0.0 else 0.0)
    return mean, float(stats.ttest_1samp(d, 0.0).pvalue)


def sign_flip_p(differences: Sequence[float] | np.ndarray) -> float:
    """Exact two-sided sign-flip (paired permutation) p-value of the mean difference.

    Under the null, each per-seed difference is symmetric around 0, so all ``2**n`` sign patterns are
    equally likely; p is the fraction whose ``|sum|`` is at least the observed ``|sum|`` (the observed
    pattern included, so p >= 2 / 2**n when any difference is non-zero; p = 1 when all are 0).
    Enumerated by ``scipy.stats.permutation_test`` (``permutation_type="samples"`` flips the sign of
    each difference). ``n == 0`` gives NaN, ``n == 1`` gives 1. ``n >`` :data:`MAX_EXACT_SIGN_FLIP_N`
    raises ``ValueError``, as do non-finite differences.
    """
    d = finite_array(differences, "differences")
    n = d.size
    if n == 0:
        return math.nan
    if n > MAX_EXACT_SIGN_FLIP_N:
        raise ValueError(f"exact sign-flip test enumerates 2**n patterns; n={n} > {MAX_EXACT_SIGN_FLIP_N}")
    if n == 1:
        return 1.0
    return _permutation_p(d, np.inf, None)


def _permutation_p(d: np.ndarray, resamples: float, rng: np.random.Generator | None) -> float:
    """P(|sum of sign-flipped d| >= |sum d|) by ``scipy.stats.permutation_test`` (exact for ``np.inf``)."""
    scale = float(np.abs(d).sum())
    if scale == 0.0:
        return 1.0

    def statistic(x: np.ndarray, axis: int) -> np.ndarray:
        # Monotone in |sum|, so p is that of |sum|. Sums equal in exact arithmetic differ in their last
        # bits between sign patterns; the offset 1 makes scipy's tie tolerance (100 ulp of the
        # statistic, >= 100 ulp of 1) cover that rounding (<= n ulp of sum|d|).
        return 1.0 + np.abs(np.sum(x, axis=axis)) / scale

    result = stats.permutation_test((d,), statistic, permutation_type="samples", vectorized=True,
                                    n_resamples=resamples, alternative="greater", rng=rng)
    return float(result.pvalue)


SIGN_FLIP_RESAMPLES = 100_000
"""Random sign patterns drawn by `sign_flip_p_sampled` above `MAX_EXACT_SIGN_FLIP_N` values."""


def sign_flip_p_sampled(values: Sequence[float] | np.ndarray, resamples: int = SIGN_FLIP_RESAMPLES,
                        seed: int = 0) -> float:
    """Sign-flip p-value of ``|sum(values)|``: exact up to :data:`MAX_EXACT_SIGN_FLIP_N` values, else
    from ``resamples`` random sign patterns drawn with ``seed`` (scipy's randomized permutation test,
    whose p counts the observed pattern: ``(hits + 1) / (resamples + 1)``, never 0).

    ``values`` may be weighted differences (``w_i * d_i``): flipping signs commutes with fixed weights,
    so this tests a weighted mean (the pooled effect across tasks). Raises ``ValueError`` on
    non-finite values or ``resamples < 1``.
    """
    d = finite_array(values, "values")
    if d.size <= MAX_EXACT_SIGN_FLIP_N:
        return sign_flip_p(d)
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    return _permutation_p(d, resamples, np.random.default_rng(seed))


def smallest_sign_flip_p(n: int, resamples: int = SIGN_FLIP_RESAMPLES) -> float:
    """The smallest p :func:`sign_flip_p_sampled` can return for ``n`` nonzero values: ``2 / 2^n`` when
    exact (only the observed sign pattern and its negation are as extreme), else
    ``1 / (resamples + 1)``; 1 for ``n < 1``. A test whose level is below it cannot reject at any effect
    size, e.g. 3 seeds (0.25) at any level under 0.25."""
    if n < 1:
        return 1.0
    return 2.0 ** (1 - n) if n <= MAX_EXACT_SIGN_FLIP_N else 1.0 / (resamples + 1)


def mean_interval(differences: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval of the mean difference, ``mean ± t_{(1+level)/2, n-1} sd / sqrt(n)``
    (``scipy.stats.ttest_1samp(...).confidence_interval``).

    ``n < 2``: ``(nan, nan)``; zero spread: ``(mean, mean)``. Raises ``ValueError`` on non-finite
    differences or a ``level`` outside (0, 1).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must lie in (0, 1), got {level}")
    d = finite_array(differences, "differences")
    if d.size < 2:
        return math.nan, math.nan
    if float(d.std(ddof=1)) == 0.0:
        return float(d.mean()), float(d.mean())
    interval = stats.ttest_1samp(d, 0.0).confidence_interval(confidence_level=level)
    return float(interval.low), float(interval.high)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979, Scand. J. Statist. 6:65-70), in input order.

    With the ``m`` finite p-values sorted ``p_(1) <= ... <= p_(m)``, the adjusted value of ``p_(i)`` is
    ``max_{j <= i} min(1, (m - j + 1) p_(j))``; rejecting where it is ``<= alpha`` controls the
    family-wise error rate at ``alpha``. NaN entries (untested comparisons) stay NaN and do not count
    in ``m``.
    """
    values = [float(p) for p in p_values]
    finite = sorted((p, i) for i, p in enumerate(values) if math.isfinite(p))
    adjusted = [math.nan] * len(values)
    running = 0.0
    for rank, (p, index) in enumerate(finite):
        running = max(running, min(1.0, (len(finite) - rank) * p))
        adjusted[index] = running
    return adjusted


def _t_test_power(noncentrality: float, df: int, critical: float) -> float:
    """Power of the two-sided one-sample t-test: ``P(|T| > critical)``, ``T ~ noncentral t(df, noncentrality)``."""
    # The lower tail as sf(critical, df, -noncentrality) (the same number by symmetry): scipy's nct.cdf
    # returns NaN instead of a tiny probability far in that tail.
    return float(stats.nct.sf(critical, df, noncentrality) + stats.nct.sf(critical, df, -noncentrality))


def minimum_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean difference the two-sided paired t-test at level ``alpha`` detects with
    probability ``power``, given the standard deviation ``sd`` of per-seed differences and ``n`` pairs.

    Solves ``P(|T| > t_{1-alpha/2, n-1}) = power`` for ``T ~ noncentral t(n - 1, delta sqrt(n) / sd)``
    (``scipy.stats.nct``; root by ``scipy.optimize.brentq``) and returns ``delta`` in the units of
    ``sd``. It grows linearly with ``sd`` and shrinks with ``n``. ``n < 2``: NaN (no test); ``sd == 0``: 0.
    Raises ``ValueError`` for a negative or non-finite ``sd`` or ``alpha``/``power`` outside (0, 1)
    with ``power > alpha``.
    """
    from scipy.optimize import brentq

    if not math.isfinite(sd) or sd < 0:
        raise ValueError(f"sd must be finite and >= 0, got {sd}")
    if not (0.0 < alpha < 1.0 and alpha < power < 1.0):
        raise ValueError(f"need 0 < alpha < power < 1, got alpha={alpha}, power={power}")
    if n < 2:
        return math.nan
    if sd == 0.0:
        return 0.0
    df = n - 1
    critical = float(stats.t.ppf(1.0 - alpha / 2.0, df))
    upper = 1.0
    while _t_test_power(upper, df, critical) < power:
        upper *= 2.0
    noncentrality = brentq(lambda nc: _t_test_power(nc, df, critical) - power, 0.0, upper, xtol=1e-12)
    return float(noncentrality) * sd / math.sqrt(n)


def normal_minimum_detectable_effect(standard_error: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """``(z_{1-alpha/2} + z_power) * standard_error``: the detectable effect of a two-sided z-test (normal
    approximation, for an estimate whose standard error is known, e.g. the pooled effect across tasks)."""
    if not (0.0 < alpha < 1.0 and alpha < power < 1.0):
        raise ValueError(f"need 0 < alpha < power < 1, got alpha={alpha}, power={power}")
    return float(stats.norm.ppf(1.0 - alpha / 2.0) + stats.norm.ppf(power)) * standard_error
