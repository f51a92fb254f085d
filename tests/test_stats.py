"""harness/stats.py: t intervals, paired differences, Holm's correction and the verdict rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from harness import stats


def test_t_interval_is_the_student_t_interval():
    x = np.array([0.61, 0.70, 0.64, 0.58])
    iv = stats.t_interval(x, 0.95)
    half = sps.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    assert iv.mean == pytest.approx(x.mean())
    assert iv.low == pytest.approx(x.mean() - half) and iv.high == pytest.approx(x.mean() + half)
    wider = stats.t_interval(x, 0.99)
    assert wider.low < iv.low and wider.high > iv.high


def test_t_interval_edge_cases():
    one = stats.t_interval([0.5], 0.95)
    assert one.mean == 0.5 and math.isnan(one.low) and math.isnan(one.high)
    same = stats.t_interval([0.4, 0.4, 0.4], 0.95)  # no spread: no variance estimate
    assert same.mean == pytest.approx(0.4) and math.isnan(same.low) and math.isnan(same.p)


def test_zero_spread_difference_is_never_better():
    """Fault: an interval with zero spread collapsed to a point and was called better."""
    diff = stats.paired_difference([0.9, 0.8, 0.7], [0.8, 0.7, 0.6], 0.95)  # +0.1 on every seed
    assert diff.mean == pytest.approx(0.1)
    assert stats.verdict(diff, 0.05) == "inconclusive"


def test_p_value_is_the_paired_t_test_and_agrees_with_the_interval():
    arm, base = [0.61, 0.72, 0.70, 0.66], [0.50, 0.60, 0.64, 0.52]
    diff = stats.paired_difference(arm, base, 0.95)
    assert diff.p == pytest.approx(sps.ttest_rel(arm, base).pvalue)
    assert (diff.p < 0.05) == (diff.low > 0)


def test_holm_adjusts_in_order_and_is_monotone():
    got = stats.holm([0.01, 0.04, 0.03, float("nan")])
    assert got[0] == pytest.approx(0.03)  # smallest p times 3 tested
    assert got[2] == pytest.approx(0.06) and got[1] == pytest.approx(0.06)  # 0.03*2, then max(0.04*1, 0.06)
    assert math.isnan(got[3])
    assert stats.holm([0.2]) == [0.2]


def test_holm_turns_a_lone_significant_arm_inconclusive():
    diff = stats.Interval(0.10, 0.01, 0.19, 3, p=0.03)
    assert stats.verdict(diff, 0.05) == "better"
    assert stats.verdict(diff, 0.05, p_adjusted=stats.holm([0.03, 0.5, 0.6])[0]) == "inconclusive"


def test_pairing_removes_the_between_seed_spread():
    # seeds differ a lot, but the arm is consistently 0.1 above its paired baseline
    base = [0.2, 0.5, 0.8]
    arm = [0.31, 0.59, 0.90]
    paired = stats.paired_difference(arm, base, 0.95)
    unpaired_arm = stats.t_interval(arm, 0.95)
    assert paired.low > 0  # the paired interval excludes zero ...
    assert unpaired_arm.low < np.mean(base)  # ... although the arm's own interval covers the base mean
    with pytest.raises(ValueError):
        stats.paired_difference([0.1, 0.2], [0.1], 0.95)


@pytest.mark.parametrize("diff, min_effect, want", [
    (stats.Interval(0.20, 0.10, 0.30, 3, p=0.01), 0.05, "better"),
    (stats.Interval(0.03, 0.01, 0.05, 3, p=0.02), 0.05, "inconclusive"),  # real but below the minimum effect
    (stats.Interval(0.20, -0.05, 0.45, 3, p=0.09), 0.05, "inconclusive"),  # interval covers zero
    (stats.Interval(-0.20, -0.30, -0.10, 3, p=0.01), 0.05, "worse"),
    (stats.Interval(-0.03, -0.05, -0.01, 3, p=0.02), 0.05, "inconclusive"),
    (stats.Interval(0.5, float("nan"), float("nan"), 1), 0.05, "inconclusive"),  # one seed
])
def test_verdict_rule(diff, min_effect, want):
    assert stats.verdict(diff, min_effect) == want


def test_overall_verdict_is_the_first_tested_arm():
    assert stats.overall_verdict(["worse", "better"]) == "worse"
    assert stats.overall_verdict([]) == "inconclusive"
