"""The statistics every verdict of the report uses, in one place.

- ``t_interval`` / ``t_test``: Student's t over independent units (training runs = seeds for a claim about a
  method; held-out pairs or prompts only for the labelled pair-level view).
- ``sign_test`` / ``discordant_interval``: per-item 0/1 scores of two models on the same items. Only the
  discordant items carry information: exact McNemar is the binomial test of "up" among the up + down items
  at 1/2 (4 up, 0 down: p = 2 * 0.5**4 = 0.125); on averaged (non-binary) scores it is the exact sign test.
  The interval is Clopper-Pearson on the share of "up" among the discordant items, scaled to the score
  difference (exact, conditional on the number of discordant items).
- ``holm``: Holm's step-down adjustment across every test a table makes (family-wise error 0.05).
- ``min_detectable_effect``: the smallest true mean difference a two-sided one-sample t-test at alpha 0.05
  detects with power 0.8 given n units of standard deviation sd (non-central t, solved exactly).
- ``describe``: the verdict words. A direction only when the test rejects after Holm; otherwise "no change
  shown", followed by non-inferiority against an explicit margin (lower bound of the 95% interval above
  -margin) and the minimum detectable effect: non-significance alone never reads as "no difference".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

ALPHA, POWER = 0.05, 0.8


@dataclass(frozen=True)
class Settings:
    """Knobs of the verdicts (``python -m analysis --help``); the defaults are the README's."""
    after_diff_min_tokens: int = 3     # after-diff log-prob only for pairs with >= this many chosen tokens after the difference
    margin_after_diff: float = 0.1     # non-inferiority margin, per-token log-prob (nats)
    margin_nats: float = 5.0           # non-inferiority margin, summed log-prob (nats)
    margin_score: float = 0.03         # non-inferiority margin, lm-eval score (accuracy / exact match)


def _clean(values) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    return values[~np.isnan(values)]


def t_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of a Student-t interval; the bounds are NaN for fewer than two values."""
    values = _clean(values)
    mean = float(values.mean()) if len(values) else math.nan
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half


def t_test(values) -> float:
    """Two-sided p-value of the one-sample t-test of mean 0 (NaN for fewer than two values or no spread:
    identical runs give no estimate of the run-to-run variance)."""
    values = _clean(values)
    if len(values) < 2:
        return math.nan
    sd = values.std(ddof=1)
    if sd == 0:
        return math.nan
    t = values.mean() / (sd / math.sqrt(len(values)))
    return float(2 * stats.t.sf(abs(t), len(values) - 1))


def sign_test(up: int, down: int) -> float:
    """Exact two-sided binomial p of ``up`` successes in ``up + down`` trials at 1/2 (exact McNemar); 1 if none."""
    n = int(up) + int(down)
    if n == 0:
        return 1.0
    tail = stats.binom.cdf(min(up, down), n, 0.5)
    return float(min(1.0, 2 * tail))


def discordant_interval(up: int, down: int, items: int, level: float = 0.95) -> tuple[float, float]:
    """Exact interval for the score difference (up - down) / items given the up + down discordant items:
    Clopper-Pearson (theta_lo, theta_hi) on up / (up + down), mapped by (2 theta - 1) * (up + down) / items."""
    n = int(up) + int(down)
    if n == 0 or items == 0:
        return 0.0, 0.0
    a = 1 - level
    low = 0.0 if up == 0 else stats.beta.ppf(a / 2, up, n - up + 1)
    high = 1.0 if up == n else stats.beta.ppf(1 - a / 2, up + 1, n - up)
    scale = n / items
    return float((2 * low - 1) * scale), float((2 * high - 1) * scale)


def holm(pvalues) -> np.ndarray:
    """Holm-adjusted p-values (NaN stays NaN and is not counted in the family)."""
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full_like(p, np.nan)
    present = np.flatnonzero(~np.isnan(p))
    order = present[np.argsort(p[present], kind="stable")]
    m, running = len(order), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


def t_power(effect: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided one-sample t-test at ``alpha`` for a true mean ``effect``."""
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)
    nc = effect / (sd / math.sqrt(n))
    upper, lower = stats.nct.sf(crit, df, nc), stats.nct.cdf(-crit, df, nc)
    # scipy's non-central t returns NaN for some far tails (df=1, nc near 20): such a tail is ~0
    return float(np.nan_to_num(upper) + np.nan_to_num(lower))


def min_detectable_effect(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest |mean| detected with ``power`` by the two-sided t-test on n units of standard deviation sd."""
    if n < 2 or not np.isfinite(sd):
        return math.nan
    if sd == 0:
        return 0.0
    se = sd / math.sqrt(n)
    high = se
    while t_power(high, sd, n, alpha) < power:  # bracket the root (non-central t is NaN far out)
        high *= 2
    return float(optimize.brentq(lambda d: t_power(d, sd, n, alpha) - power, 0.0, high, xtol=1e-12 * se))


def sample_mde(values) -> float:
    values = _clean(values)
    return min_detectable_effect(float(values.std(ddof=1)), len(values)) if len(values) >= 2 else math.nan


def describe(low: float, high: float, p_holm: float, margin: float, mde: float, unit: str = "",
             digits: int = 3) -> str:
    """Verdict words: a direction only when Holm-adjusted p < 0.05 (and the interval excludes 0); otherwise
    non-inferiority at ``margin`` (lower bound above -margin) and the minimum detectable effect."""
    if np.isnan(low) or np.isnan(p_holm):
        return "cannot say (fewer than two runs, or runs without spread)"
    if p_holm < ALPHA and high < 0:
        return "lowered"
    if p_holm < ALPHA and low > 0:
        return "raised"
    side = (f"not lower than -{margin:g}{unit} (non-inferior at that margin)" if low > -margin
            else f"non-inferiority at -{margin:g}{unit} not shown")
    return (f"no change shown, {side}; the smallest effect these runs detect (power 0.8, alpha 0.05) is "
            f"{mde:.{digits}f}{unit}")
