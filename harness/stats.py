"""Intervals, paired differences, the multiple-comparison correction and verdicts over seeds.

The rule (the same one CLAUDE.md gives the agent): an arm is `better` than the baseline only
when its paired difference (arm - baseline, per seed, on the primary cell) is significant —
the two-sided paired t test's p value, Holm-corrected over the ablation's tested arms, below
1 - confidence (with one tested arm: the confidence interval excludes zero) — AND the mean
difference is at least `config.ABLATION.min_effect`; `worse` mirrors it; anything else is
`inconclusive`. Differences with no spread over the seeds have no variance estimate: their
interval and p value are undefined, and they are never `better` or `worse`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

VERDICTS = ("better", "worse", "inconclusive")


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int
    p: float = float("nan")  # two-sided t test of mean == 0 (for a paired difference)

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def t_interval(values: list[float] | np.ndarray, confidence: float) -> Interval:
    """Mean, two-sided t interval and the t test's p value of mean == 0. Fewer than 2 values,
    or values with no spread: the interval and p are nan (no variance estimate)."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    mean = float(x.mean()) if n else float("nan")
    # a spread at rounding level (0.9 - 0.8 vs 0.8 - 0.7) is no spread: it has no information
    if n < 2 or np.ptp(x) <= 1e-9:
        return Interval(mean, float("nan"), float("nan"), n)
    # Imported here: scipy.stats takes ~1 s to import, and everything that validates an
    # ablation spec (lab submit, lab show, the daemon's admission) imports this module.
    from scipy import stats

    sem = float(stats.sem(x))
    low, high = stats.t.interval(confidence, df=n - 1, loc=mean, scale=sem)
    p = float(2 * stats.t.sf(abs(mean) / sem, df=n - 1))
    return Interval(mean, float(low), float(high), n, p)


def paired_difference(arm: list[float], baseline: list[float], confidence: float) -> Interval:
    """Interval of the per-seed difference arm - baseline (the seeds pair the two)."""
    if len(arm) != len(baseline):
        raise ValueError(f"paired difference needs equal seeds ({len(arm)} vs {len(baseline)})")
    return t_interval(np.asarray(arm, float) - np.asarray(baseline, float), confidence)


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p values, in the input order (nan stays nan and is not counted)."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    m = len(order)
    adjusted = [float("nan")] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def verdict(diff: Interval, min_effect: float, p_adjusted: float | None = None,
            confidence: float = 0.95) -> str:
    """better / worse / inconclusive by the rule in the module docstring. Without an adjusted p
    (one comparison) the interval decides, which is the same test."""
    p = diff.p if p_adjusted is None else p_adjusted
    if math.isnan(diff.low) or math.isnan(diff.high) or math.isnan(p):
        return "inconclusive"
    significant = p < 1 - confidence
    if significant and diff.mean > 0 and diff.mean >= min_effect:
        return "better"
    if significant and diff.mean < 0 and diff.mean <= -min_effect:
        return "worse"
    return "inconclusive"


def overall_verdict(arm_verdicts: list[str]) -> str:
    """The ablation's verdict is that of its first non-baseline arm (the idea under test);
    the other arms are context and carry their own verdicts."""
    return arm_verdicts[0] if arm_verdicts else "inconclusive"
