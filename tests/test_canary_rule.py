"""The canary decision rule (models.CanaryRule) and its interval, on hand-made statistics."""

from __future__ import annotations

import math
import statistics
from typing import Any

import pytest

from agentkiln.models import Canary, CanaryRule, CanaryStatus
from agentkiln.production.assignment import BASELINE, CANDIDATE, variant
from agentkiln.production.canary import (
    ArmStats,
    CanaryStats,
    arm_summary,
    choose_arm,
    difference_interval,
    evaluate,
    rating_value,
    served_version,
)


def canary(**rule: Any) -> Canary:
    return Canary(canary_id="can-1", candidate_resources_id="res-c", baseline_resources_id="res-b", share=0.5,
                  rule=CanaryRule(**rule))  # fmt: skip


def stats_of(baseline: list[float], candidate: list[float], confidence: float = 0.95) -> CanaryStats:
    """Stats from per-session values, through the same functions canary_stats uses."""
    b = arm_summary(ArmStats(resources_id="res-b", version=1, ratings=len(baseline)), baseline)
    c = arm_summary(ArmStats(resources_id="res-c", version=2, ratings=len(candidate)), candidate)
    d, se, lower, upper = difference_interval(b, c, confidence)
    return CanaryStats(canary_id="can-1", metric="user", confidence=confidence, baseline=b, candidate=c,
                       difference=d, std_error=se, lower=lower, upper=upper)  # fmt: skip


def test_interval_formula() -> None:
    """d +- z * sqrt(s_c^2/n_c + s_b^2/n_b), sample variances, z for 95%."""
    s = stats_of([0, 1, 1, 1], [1, 1, 0, 0])
    se = math.sqrt((1 / 3) / 4 + 0.25 / 4)
    z = statistics.NormalDist().inv_cdf(0.975)
    assert s.baseline.mean == 0.75 and s.candidate.mean == 0.5
    assert s.baseline.variance == pytest.approx(0.25) and s.candidate.variance == pytest.approx(1 / 3)
    assert s.difference == pytest.approx(-0.25)
    assert s.std_error == pytest.approx(se)
    assert (s.lower, s.upper) == (pytest.approx(-0.25 - z * se), pytest.approx(-0.25 + z * se))
    wider = stats_of([0, 1, 1, 1], [1, 1, 0, 0], confidence=0.99)
    assert wider.lower < s.lower and wider.upper > s.upper


def test_interval_undefined_below_two_sessions() -> None:
    s = stats_of([1.0], [0.0, 1.0])
    assert s.difference == -0.5 and s.lower is None and s.upper is None
    assert evaluate(canary(min_samples=1), s) is None
    empty = stats_of([], [])
    assert empty.difference is None and empty.baseline.mean is None


def test_below_min_samples_no_verdict() -> None:
    clearly_worse = stats_of([1.0] * 29, [0.0] * 29)
    assert clearly_worse.upper < 0
    assert evaluate(canary(min_samples=30), clearly_worse) is None
    assert evaluate(canary(min_samples=29), clearly_worse).action == "rollback"
    one_short = stats_of([1.0] * 40, [0.0] * 29)  # both arms need min_samples
    assert evaluate(canary(min_samples=30), one_short) is None


def test_rollback_when_worse_beyond_doubt() -> None:
    s = stats_of([1, 1, 1, 0] * 10, [0, 0, 1, 0] * 10)
    decision = evaluate(canary(min_samples=30), s)
    assert decision is not None and decision.action == "rollback" and decision.by == "rule"
    assert "worse" in decision.reason and decision.stats["upper"] == pytest.approx(s.upper)


def test_promote_when_not_worse_beyond_margin() -> None:
    same = stats_of([1, 1, 1, 0] * 25, [1, 1, 1, 0] * 25)
    assert same.lower < 0  # a tie is not shown better ...
    assert evaluate(canary(min_samples=30, max_regression=0.0), same) is None  # ... so margin 0 waits
    assert same.lower > -0.2
    assert evaluate(canary(min_samples=30, max_regression=0.2), same).action == "promote"
    better = stats_of([1, 0, 0, 0] * 25, [1, 1, 1, 0] * 25)
    assert better.lower > 0
    assert evaluate(canary(min_samples=30), better).action == "promote"


def test_zero_variance_all_thumbs_up_both_sides() -> None:
    s = stats_of([1.0] * 30, [1.0] * 30)
    assert (s.difference, s.std_error, s.lower, s.upper) == (0.0, 0.0, 0.0, 0.0)
    assert evaluate(canary(min_samples=30, max_regression=0.0), s) is None  # 0 > -0 is false: strict
    assert evaluate(canary(min_samples=30, max_regression=0.01), s).action == "promote"
    opposite = stats_of([1.0] * 30, [0.0] * 30)
    assert (opposite.lower, opposite.upper) == (-1.0, -1.0)
    assert evaluate(canary(min_samples=30), opposite).action == "rollback"


def test_max_samples_without_verdict_rolls_back() -> None:
    noisy = stats_of([1, 0] * 20, [1, 0, 0, 1] * 10)  # d = 0, wide interval
    rule = {"min_samples": 10, "max_samples": 40, "max_regression": 0.0}
    decision = evaluate(canary(**rule), noisy)
    assert decision is not None and decision.action == "rollback" and "no verdict" in decision.reason
    assert evaluate(canary(**{**rule, "max_samples": 41}), noisy) is None


def test_only_an_active_canary_is_decided() -> None:
    s = stats_of([1.0] * 30, [0.0] * 30)
    assert evaluate(canary().model_copy(update={"status": CanaryStatus.rolled_back}), s) is None


def test_values_and_version_labels() -> None:
    assert [rating_value(v) for v in (True, False, 3, 0.5, "good", float("nan"))] == [1.0, 0.0, 3.0, 0.5, None, None]
    assert [served_version(v) for v in ("v3", "agent@v3", "a.b-c@v12", "3", "base", None, "v3x")] == [
        3,
        3,
        12,
        None,
        None,
        None,
        None,
    ]


def test_choose_arm() -> None:
    c = canary()
    versions = (2, 1)
    on_candidate = next(f"s{i}" for i in range(100) if variant(c, f"s{i}") == CANDIDATE)
    on_baseline = next(f"s{i}" for i in range(100) if variant(c, f"s{i}") == BASELINE)
    assert choose_arm(c, "v2", on_baseline, versions) == CANDIDATE  # the label wins over the assignment
    assert choose_arm(c, "planner@v1", on_candidate, versions) == BASELINE
    assert choose_arm(c, None, on_candidate, versions) == CANDIDATE  # no label: the sticky assignment
    assert choose_arm(c, "v7", on_baseline, versions) == BASELINE  # the deployed weights under an older label
    assert choose_arm(c, "v7", on_candidate, versions) is None  # the candidate did not serve it
    assert choose_arm(c, None, None, versions) is None
    ended = c.model_copy(update={"status": CanaryStatus.promoted})
    assert choose_arm(ended, None, on_candidate, versions) == CANDIDATE  # as assigned while it ran
