"""Canary statistics from stored feedback, the controller's decisions, and racing deciders (store level)."""

from __future__ import annotations

import asyncio

import pytest

from agentkiln.models import CanaryIn, CanaryRule, CanaryStatus, FeedbackIn
from agentkiln.production import canary as canaries
from agentkiln.production.assignment import BASELINE, CANDIDATE, variant
from agentkiln.production.canary import CanaryController, canary_stats
from agentkiln.store.base import InvalidTransitionError, Store
from tests.canary_fakes import canary_store, publish, rate, rate_sessions, slowed, store_class, versions


async def deployed_copies(store: Store, canary_id: str) -> list:
    return [r for r in await store.query_resources() if not r.candidate and r.metadata.get("canary_id") == canary_id]


async def start(store: Store, share: float = 0.5, **rule) -> tuple:
    base, cand = await versions(store)
    canary = await store.start_canary(CanaryIn(candidate_resources_id=cand.resources_id, share=share,
                                               rule=CanaryRule(**rule)))  # fmt: skip
    return base, cand, canary


async def test_stats_per_arm_by_served_version() -> None:
    store = canary_store()
    base, cand = await versions(store)
    await rate(store, "early", f"v{cand.version}", False)  # before the canary started: not counted
    canary = await store.start_canary(CanaryIn(candidate_resources_id=cand.resources_id, share=0.5))
    vb, vc = f"v{base.version}", f"v{cand.version}"
    await rate(store, "b1", vb, True, False)  # one session, two ratings: the session's mean (0.5) counts once
    await rate(store, "b2", vb, True)
    await rate(store, "b3", f"planner@v{base.version}", 1.0)  # an agent's own weights of the baseline
    await rate(store, "c1", vc, False)
    await rate(store, "c2", f"planner@v{cand.version}", True)
    await rate(store, "c3", vc, "great")  # a label is not a value of the metric
    await rate(store, "c4", vc, True, name="thumbs")  # another metric
    stats = await canary_stats(store, canary)
    assert (stats.baseline.n, stats.baseline.ratings, stats.candidate.n, stats.candidate.ratings) == (3, 4, 2, 2)
    assert stats.baseline.mean == pytest.approx((0.5 + 1 + 1) / 3)
    assert stats.candidate.mean == pytest.approx(0.5)
    assert stats.difference == pytest.approx(0.5 - 2.5 / 3)
    assert stats.lower is not None and stats.lower < stats.difference < stats.upper
    assert (stats.baseline.resources_id, stats.candidate.version) == (base.resources_id, cand.version)


async def test_session_feedback_goes_by_assignment() -> None:
    store = canary_store()
    _, _, canary = await start(store)
    sessions = [f"user-{i}" for i in range(40)]
    on_candidate = [s for s in sessions if variant(canary, s) == CANDIDATE]
    on_baseline = [s for s in sessions if variant(canary, s) == BASELINE]
    assert on_candidate and on_baseline
    for s in sessions:
        await store.open_session(s)  # no call recorded: the feedback has no version
        await store.add_feedback(FeedbackIn(session_id=s, value=s in on_candidate))
    stats = await canary_stats(store, canary)
    assert (stats.candidate.n, stats.candidate.mean) == (len(on_candidate), 1.0)
    assert (stats.baseline.n, stats.baseline.mean) == (len(on_baseline), 0.0)
    # A call on a candidate-assigned session that an older version served is no arm's evidence.
    stale = next(f"late-{i}" for i in range(200) if variant(canary, f"late-{i}") == CANDIDATE)
    await rate(store, stale, "v99", False)
    after = await canary_stats(store, canary)
    assert after.left_out == 1 and after.candidate.n == stats.candidate.n


async def test_controller_rolls_back_a_clearly_worse_candidate() -> None:
    store = canary_store()
    base, cand, canary = await start(store, min_samples=10)
    controller = CanaryController(store)
    await rate_sessions(store, "b", f"v{base.version}", [True] * 9 + [False])
    await rate_sessions(store, "c", f"v{cand.version}", [False] * 8 + [True] * 2)
    assert (await controller.step()).status == CanaryStatus.rolled_back
    assert controller.last_stats is not None and controller.last_stats.candidate.n == 10
    decided = await store.get_canary(canary.canary_id)
    assert decided.status == CanaryStatus.rolled_back
    assert decided.decisions[-1].action == "rollback" and decided.decisions[-1].by == "rule"
    assert decided.decisions[-1].stats["candidate"]["n"] == 10
    assert await deployed_copies(store, canary.canary_id) == []
    assert (await store.get_latest_resources()).resources_id == base.resources_id
    assert await controller.step() is None  # nothing active any more


async def test_controller_waits_for_min_samples() -> None:
    store = canary_store()
    base, cand, canary = await start(store, min_samples=10)
    await rate_sessions(store, "b", f"v{base.version}", [True] * 9)
    await rate_sessions(store, "c", f"v{cand.version}", [False] * 9)
    assert await CanaryController(store).step() is None
    assert (await store.get_canary(canary.canary_id)).status == CanaryStatus.active


async def test_controller_promotes_an_equal_candidate() -> None:
    store = canary_store()
    base, cand, canary = await start(store, min_samples=30, max_regression=0.2)
    pattern = [True, True, True, True, False] * 8
    await rate_sessions(store, "b", f"v{base.version}", pattern)
    await rate_sessions(store, "c", f"v{cand.version}", pattern)
    decided = await CanaryController(store).step()
    assert decided is not None and decided.status == CanaryStatus.promoted
    [copy] = await deployed_copies(store, canary.canary_id)
    assert decided.promoted_resources_id == copy.resources_id
    latest = await store.get_latest_resources()
    assert latest.resources_id == copy.resources_id and not latest.candidate
    assert latest.llms == cand.llms and latest.prompts == cand.prompts
    assert latest.metadata["promoted_from"] == cand.resources_id and latest.version > cand.version
    stored = await store.get_canary(canary.canary_id)
    assert stored.status == CanaryStatus.promoted and stored.decisions[-1].by == "rule"
    assert (await canaries.with_promoted(store, stored)).promoted_resources_id == copy.resources_id
    assert (await canary_stats(store, stored)).promoted_resources_id == copy.resources_id


async def test_manual_canary_is_not_decided_by_the_rule() -> None:
    store = canary_store()
    base, cand, canary = await start(store, min_samples=5, auto=False)
    await rate_sessions(store, "b", f"v{base.version}", [True] * 10)
    await rate_sessions(store, "c", f"v{cand.version}", [False] * 10)
    controller = CanaryController(store)
    assert await controller.step() is None
    assert controller.last_stats.upper < 0  # the evidence is there; only a person decides
    assert (await store.get_canary(canary.canary_id)).status == CanaryStatus.active


async def test_racing_controllers_publish_one_deployed_version() -> None:
    store = slowed(store_class())(sweep_interval_s=None)
    base, cand, canary = await start(store, min_samples=10, max_regression=0.5)
    await rate_sessions(store, "b", f"v{base.version}", [True] * 10)
    await rate_sessions(store, "c", f"v{cand.version}", [True] * 10)
    controllers = [CanaryController(store) for _ in range(3)]
    results = await asyncio.gather(*(c.step() for c in controllers))
    assert all(c.last_stats is not None for c in controllers)  # every one saw the active canary
    assert sum(r is not None for r in results) == 1
    assert len(await deployed_copies(store, canary.canary_id)) == 1
    stored = await store.get_canary(canary.canary_id)
    assert [d.action for d in stored.decisions].count("promote") == 1


async def test_promote_racing_a_rollback_deploys_nothing_when_the_rollback_wins() -> None:
    store = canary_store()
    base, _, canary = await start(store)
    await canaries.rollback(store, canary, reason="by hand first")
    with pytest.raises(InvalidTransitionError):
        await canaries.promote(store, canary, by="rule", reason="stale view")  # still thinks it is active
    assert await deployed_copies(store, canary.canary_id) == []
    assert (await store.get_latest_resources()).resources_id == base.resources_id


async def test_an_unpublished_promotion_is_finished_once() -> None:
    """A promotion that stopped between the claim and the publish is published by the next pass."""
    store = canary_store()
    _, _, canary = await start(store)
    await store.decide_canary(canary.canary_id, canaries.CanaryDecision(action="promote", by="user"))
    assert await deployed_copies(store, canary.canary_id) == []
    controller = CanaryController(store)
    await controller.step()
    [copy] = await deployed_copies(store, canary.canary_id)
    assert (await store.get_latest_resources()).resources_id == copy.resources_id
    await controller.step()
    await CanaryController(store).step()  # a fresh controller (another replica) finds it published
    assert len(await deployed_copies(store, canary.canary_id)) == 1


async def test_promote_refuses_a_candidate_that_is_deployed() -> None:
    store = canary_store()
    base = await publish(store, "base")
    other = await publish(store, "other")  # deployed, not a candidate
    canary = await store.start_canary(CanaryIn(candidate_resources_id=other.resources_id,
                                               baseline_resources_id=base.resources_id))  # fmt: skip
    with pytest.raises(canaries.ValidationError, match="not a candidate"):
        await canaries.promote(store, canary)
    assert (await store.get_canary(canary.canary_id)).status == CanaryStatus.active
