"""Intervals over seeds for the report: Student-t 95% intervals of a mean and of paired differences.

With n seeds, values x_1..x_n, mean m and sample standard deviation s, the 95% interval of the
mean is m ± t_{0.975, n-1} s / sqrt(n) (Student's t with n - 1 degrees of freedom: the seeds are
few, so the normal quantile 1.96 would be too narrow). A paired difference takes, seed by seed,
d_i = x_i - r_i between a method and a reference trained on the same seed (same split, initial
weights and batch order), and gives the same interval for the mean of d; an interval that
contains 0 is "within noise". One seed gives no interval (NaN).

The t quantile is computed here (no SciPy): the t CDF through the regularised incomplete beta
function, F(t) = 1 - I_{nu/(nu+t^2)}(nu/2, 1/2) / 2 for t >= 0, evaluated by its continued
fraction (Lentz's method), and inverted by bisection.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function I_x(a, b) (converges fast for
    x < (a + 1) / (a + b + 2)), by the modified Lentz method."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) for a, b > 0 and x in [0, 1]."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"incomplete_beta needs x in [0, 1]; got {x!r}")
    if x in (0.0, 1.0):
        return x
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b  # the symmetry I_x(a,b) = 1-I_{1-x}(b,a)


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0; got {df!r}")
    tail = 0.5 * incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (t_{0.975, 4} = 2.7764)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"a quantile needs p in (0, 1); got {p!r}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):  # bisection to machine precision
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


def clean(values: Sequence[float | None]) -> list[float]:
    """The values that are numbers (None and NaN dropped)."""
    return [float(v) for v in values if v is not None and not math.isnan(v)]


def mean_interval(values: Sequence[float | None], level: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of the two-sided t interval at ``level``, n) of the values that are
    numbers; the half-width is NaN for fewer than two values, and both are NaN for none."""
    xs = clean(values)
    if not xs:
        return math.nan, math.nan, 0
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return mean, math.nan, len(xs)
    half = t_quantile(0.5 + level / 2, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return mean, half, len(xs)


def paired_interval(values: dict[int, float | None], reference: dict[int, float | None],
                    level: float = 0.95) -> tuple[float, float, list[int]]:
    """Mean of value - reference over the seeds both have (numbers only), the half-width of
    its t interval, and those seeds."""
    seeds = sorted(s for s in values.keys() & reference.keys()
                   if clean([values[s]]) and clean([reference[s]]))
    mean, half, _ = mean_interval([values[s] - reference[s] for s in seeds], level)
    return mean, half, seeds


def within_noise(mean: float, half: float) -> bool | None:
    """Whether the interval mean ± half contains 0 (None: no interval)."""
    if math.isnan(mean) or math.isnan(half):
        return None
    return mean - half <= 0.0 <= mean + half
