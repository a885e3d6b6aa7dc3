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
    scale = float(np.abs(d).sum())
    if n == 1 or scale == 0.0:
        return 1.0

    def statistic(x: np.ndarray, axis: int) -> np.ndarray:
        # Monotone in |sum|, so p is that of |sum|. Sums equal in exact arithmetic differ in their last
        # bits between sign patterns; the offset 1 makes scipy's tie tolerance (100 ulp of the
        # statistic, >= 100 ulp of 1) cover that rounding (<= n ulp of sum|d|).
        return 1.0 + np.abs(np.sum(x, axis=axis)) / scale

    result = stats.permutation_test((d,), statistic, permutation_type="samples", vectorized=True,
                                    n_resamples=np.inf, alternative="greater")
    return float(result.pvalue)
