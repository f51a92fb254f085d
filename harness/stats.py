"""Intervals, paired differences and verdicts over seeds.

The rule (the same one CLAUDE.md gives the agent): an arm is `better` than the baseline only
when the confidence interval of the paired difference (arm - baseline, per seed) lies above
zero AND the mean difference is at least `config.ABLATION.min_effect`; `worse` mirrors it;
anything else is `inconclusive`. Intervals are Student-t over seeds (scipy.stats.t).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

VERDICTS = ("better", "worse", "inconclusive")


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def t_interval(values: list[float] | np.ndarray, confidence: float) -> Interval:
    """Mean and two-sided t interval. Fewer than 2 values: the interval is (nan, nan); all
    values equal: the interval collapses onto the mean."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    mean = float(x.mean()) if n else float("nan")
    if n < 2:
        return Interval(mean, float("nan"), float("nan"), n)
    if np.ptp(x) == 0.0:  # no spread: scipy would give nan, the interval is the point
        return Interval(mean, mean, mean, n)
    sem = float(stats.sem(x))
    low, high = stats.t.interval(confidence, df=n - 1, loc=mean, scale=sem)
    return Interval(mean, float(low), float(high), n)


def paired_difference(arm: list[float], baseline: list[float], confidence: float) -> Interval:
    """Interval of the per-seed difference arm - baseline (the seeds pair the two)."""
    if len(arm) != len(baseline):
        raise ValueError(f"paired difference needs equal seeds ({len(arm)} vs {len(baseline)})")
    return t_interval(np.asarray(arm, float) - np.asarray(baseline, float), confidence)


def verdict(diff: Interval, min_effect: float) -> str:
    """better / worse / inconclusive by the rule in the module docstring."""
    if math.isnan(diff.low) or math.isnan(diff.high):
        return "inconclusive"
    if diff.low > 0 and diff.mean >= min_effect:
        return "better"
    if diff.high < 0 and diff.mean <= -min_effect:
        return "worse"
    return "inconclusive"


def overall_verdict(arm_verdicts: list[str]) -> str:
    """The ablation's verdict is that of its first non-baseline arm (the idea under test);
    the other arms are context and carry their own verdicts."""
    return arm_verdicts[0] if arm_verdicts else "inconclusive"
