"""Statistics for reports and benchmarks: mean ± std over seeds, a paired 95 % confidence interval
with the direction verdict (``distillery reproduce``, the methods table), and a distribution-free
interval for a median (``distillery bench``).

A setting and its baseline are run with the same seeds (same data subset, same initial weights
where the architectures agree), so their per-seed differences d_s = setting_s − baseline_s are
paired. The interval is Student's t on those differences:

    mean(d) ± t_{0.975, n−1} · sd(d) / √n,      sd with n − 1 in the denominator.

The t quantile is computed here (no scipy): the t CDF through the regularised incomplete beta
function, inverted by bisection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1 in the denominator; 0 for a single value)."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz's method)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                          -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < eps:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), for a, b > 0 and 0 ≤ x ≤ 1."""
    if not 0 <= x <= 1:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1 - math.exp(log_front) * _beta_continued_fraction(b, a, 1 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with ``df`` degrees of freedom: 1 − ½·I_{df/(df+t²)}(df/2, ½) for t ≥ 0."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    tail = 0.5 * incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t such that P(T ≤ t) = p (Student's t, ``df`` degrees of freedom), by bisection."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2 * high
    for _ in range(200):
        mid = (low + high) / 2
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, high):
            break
    return (low + high) / 2


@dataclass(frozen=True)
class PairedDifference:
    """mean(setting − baseline) over ``n`` paired seeds, with its confidence interval (None for n < 2)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    level: float = 0.95

    @property
    def has_interval(self) -> bool:
        return self.low is not None and self.high is not None


def paired_difference(setting: Sequence[float], baseline: Sequence[float], level: float = 0.95) -> PairedDifference:
    """Mean of the per-seed differences and its two-sided t interval at ``level``."""
    if len(setting) != len(baseline):
        raise ValueError(f"paired values need one baseline per setting value: {len(setting)} vs {len(baseline)}")
    diffs = [s - b for s, b in zip(setting, baseline)]
    mean, sd = mean_std(diffs)
    n = len(diffs)
    if n < 2:
        return PairedDifference(mean, None, None, n, level)
    half = t_quantile(1 - (1 - level) / 2, n - 1) * sd / math.sqrt(n)
    return PairedDifference(mean, mean - half, mean + half, n, level)


def verdict(diff: PairedDifference, direction: int) -> str:
    """Whether the paper's claimed direction (+1: setting above baseline, −1: below) is reproduced.

    'yes' when the whole interval lies on the claimed side of 0, 'no' when it lies wholly on the
    other side, 'inconclusive' when it spans 0 or there is no interval (one seed).
    """
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction}")
    if not diff.has_interval:
        return "inconclusive (1 seed)"
    low, high = direction * diff.low, direction * diff.high  # type: ignore[operator]
    low, high = min(low, high), max(low, high)
    if low > 0:
        return "yes"
    if high < 0:
        return "no"
    return "inconclusive"


@dataclass(frozen=True)
class MedianInterval:
    """The median of ``n`` values with a distribution-free interval covering the true median with
    probability ``coverage`` (≥ the level asked for when n ≥ 6; for n < 6 no pair of order
    statistics reaches 95 %, and the interval is the range, with the coverage it has)."""

    median: float
    low: float
    high: float
    n: int
    coverage: float


def median_interval(values: Sequence[float], level: float = 0.95) -> MedianInterval:
    """Median and order-statistic confidence interval [x_(k), x_(n+1−k)] (1-based, sorted values).

    k is the largest rank with P(Bin(n, ½) ≤ k − 1) ≤ (1 − level)/2, so the interval covers the
    population median with probability 1 − 2·P(Bin(n, ½) ≤ k − 1) whatever the distribution: a
    slow spell on a shared machine can skew timings but cannot break this interval.
    """
    if not values:
        raise ValueError("median_interval needs at least one value")
    x = sorted(values)
    n = len(x)
    mid = n // 2
    median = x[mid] if n % 2 else (x[mid - 1] + x[mid]) / 2
    k, tail = 1, 0.5**n  # rank k and P(Bin(n, 1/2) <= k - 1); rank 1 (the range) whatever its coverage
    while k < (n + 1) // 2:
        next_tail = tail + math.comb(n, k) / 2**n  # P(Bin(n, 1/2) <= k)
        if next_tail > (1 - level) / 2:
            break
        tail, k = next_tail, k + 1
    return MedianInterval(median, x[k - 1], x[n - k], n, 1 - 2 * tail)


def format_diff(diff: PairedDifference | None, unit: str = "") -> str:
    """``+0.91 [+0.47, +1.35]``: a paired difference with its interval, for reports (``—`` for none)."""
    if diff is None:
        return "—"
    interval = f"[{diff.low:+.2f}, {diff.high:+.2f}]" if diff.has_interval else "CI n/a (1 seed)"
    return f"{diff.mean:+.2f}{unit} {interval}"
