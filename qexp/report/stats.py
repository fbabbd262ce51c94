"""Small-sample statistics for tables over seeds: Student's t distribution, Welch's t-test, CIs.

Implemented here (regularized incomplete beta by Lentz's continued fraction) so that ``qexp table`` needs
no SciPy; tests/test_stats.py checks the numbers against textbook quantiles and, where installed, SciPy.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

#: confidence level of every interval qexp prints
LEVEL = 0.95


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), converging for x < (a+1)/(a+b+2)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` (real, > 0) degrees of freedom."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return tail if t >= 0 else 1.0 - tail


def t_cdf(t: float, df: float) -> float:
    return 1.0 - t_sf(t, df)


def t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t (bisection on the CDF: monotone, exact to ~1e-12)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {q}")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_ci(values: Sequence[float], level: float = LEVEL) -> float | None:
    """Half-width of the t confidence interval of the mean (None below two values)."""
    n = len(values)
    if n < 2:
        return None
    return t_ppf(0.5 + level / 2.0, n - 1) * statistics.stdev(values) / math.sqrt(n)


@dataclass(frozen=True)
class Welch:
    """Welch's unequal-variance comparison of two samples: ``diff = mean(a) - mean(b)``."""

    diff: float
    lo: float  # confidence interval of diff at ``level``
    hi: float
    p: float  # two-sided p-value of diff == 0
    t: float
    df: float
    level: float = LEVEL


def welch(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Welch | None:
    """Welch's t-test and CI of mean(a) - mean(b); None unless both samples have two or more values.

    When both samples have zero variance the difference is exact: p = 0 if the means differ, else 1.
    """
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return None
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    va, vb = statistics.variance(a) / na, statistics.variance(b) / nb
    diff = ma - mb
    se2 = va + vb
    if se2 == 0.0:
        p = 1.0 if diff == 0.0 else 0.0
        return Welch(diff, diff, diff, p, math.copysign(math.inf, diff) if diff else 0.0, na + nb - 2.0, level)
    se = math.sqrt(se2)
    df = se2 * se2 / (va * va / (na - 1) + vb * vb / (nb - 1))
    t = diff / se
    p = min(1.0, 2.0 * t_sf(abs(t), df))
    half = t_ppf(0.5 + level / 2.0, df) * se
    return Welch(diff, diff - half, diff + half, p, t, df, level)
