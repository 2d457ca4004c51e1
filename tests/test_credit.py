"""Credit assignment with hand-computed values."""

from __future__ import annotations

import math

import pytest

from agentkiln.adapter.credit import (
    CreditConfig,
    RewardEvent,
    assign_advantages,
    group_advantages,
    group_key,
    returns_to_go,
    step_rewards,
)
from agentkiln.adapter.transitions import build_transitions
from agentkiln.models import Attempt, AttemptStatus, Rollout, Span
from agentkiln.protocol import SpanAttrs, SpanNames


def _llm(seq: int, rid: str = "r1", aid: str = "a1", prompt=(1, 2), resp=(3, 4)) -> Span:
    return Span(
        rollout_id=rid,
        attempt_id=aid,
        name=SpanNames.llm_call,
        sequence_id=seq,
        attributes={
            SpanAttrs.prompt_token_ids: list(prompt),
            SpanAttrs.response_token_ids: list(resp),
            SpanAttrs.response_logprobs: [-0.5] * len(resp),
            SpanAttrs.agent_name: "solver",
            SpanAttrs.finish_reason: "stop",
        },
    )


def _reward(seq: int, value: float, final: bool, rid: str = "r1", aid: str = "a1") -> Span:
    return Span(
        rollout_id=rid,
        attempt_id=aid,
        name=SpanNames.reward,
        sequence_id=seq,
        attributes={SpanAttrs.reward_value: value, SpanAttrs.reward_final: final},
    )


def _rollout(rid: str = "r1", group: str | None = "g") -> tuple[Rollout, list[Attempt]]:
    meta = {"group_id": group} if group else {}
    return (
        Rollout(rollout_id=rid, input={"q": "1+1"}, metadata=meta),
        [
            Attempt(
                attempt_id=f"{rid}-a1" if rid != "r1" else "a1",
                rollout_id=rid,
                sequence_id=1,
                status=AttemptStatus.succeeded,
            )
        ],
    )


def test_final_reward_broadcast_to_every_transition() -> None:
    rollout, attempts = _rollout()
    spans = [_llm(1), _llm(2), _llm(3), _reward(4, 0.7, True)]
    res = build_transitions(rollout, attempts, spans, credit=CreditConfig(mode="final"))
    assert [t.return_ for t in res.transitions] == [0.7, 0.7, 0.7]
    assert [t.reward for t in res.transitions] == [0.0, 0.0, 0.7]  # immediate reward sits on the last step
    assert [t.done for t in res.transitions] == [False, False, True]
    assert res.rollout_return == 0.7


def test_discounted_return_to_go_with_two_intermediate_rewards() -> None:
    rollout, attempts = _rollout()
    # call1, reward 1.0 (after call1), call2, reward 0.5 (after call2), call3, final 2.0
    spans = [_llm(1), _reward(2, 1.0, False), _llm(3), _reward(4, 0.5, False), _llm(5), _reward(6, 2.0, True)]
    res = build_transitions(rollout, attempts, spans, credit=CreditConfig(mode="discounted", gamma=0.9))
    assert [t.reward for t in res.transitions] == [1.0, 0.5, 2.0]
    g2 = 2.0
    g1 = 0.5 + 0.9 * g2  # 2.3
    g0 = 1.0 + 0.9 * g1  # 3.07
    assert [t.return_ for t in res.transitions] == pytest.approx([g0, g1, g2])
    assert res.rollout_return == pytest.approx(3.07)


def test_step_rewards_attach_to_preceding_call() -> None:
    events = [
        RewardEvent(1, 0.25, False),
        RewardEvent(5, 1.0, False),
        RewardEvent(9, 3.0, True),
        RewardEvent(10, 4.0, True),
    ]
    # reward before any call -> first step; only the last final counts.
    assert step_rewards([2, 4, 8], events) == [0.25, 1.0, 4.0]
    assert returns_to_go([1.0, 0.0, 1.0], 0.5) == [1.25, 0.5, 1.0]


def test_group_advantages_group_of_four() -> None:
    returns = {"a": 1.0, "b": 0.0, "c": 0.0, "d": 1.0, "solo": 5.0}
    groups = {"a": "g", "b": "g", "c": "g", "d": "g", "solo": "h"}
    adv = group_advantages(returns, groups, eps=0.0 + 1e-6)
    # mean 0.5, population std 0.5 -> +-1
    assert adv["a"] == pytest.approx(1.0, abs=1e-5)
    assert adv["b"] == pytest.approx(-1.0, abs=1e-5)
    assert adv["solo"] == 0.0
    no_std = group_advantages({"a": 3.0, "b": 1.0, "c": 2.0, "d": 6.0}, {k: "g" for k in "abcd"}, scale_by_std=False)
    assert no_std == pytest.approx({"a": 0.0, "b": -2.0, "c": -1.0, "d": 3.0})
    same = group_advantages({"a": 1.0, "b": 1.0}, {"a": "g", "b": "g"})
    assert same == {"a": 0.0, "b": 0.0}


def test_advantage_once_per_rollout_regardless_of_transition_count() -> None:
    results = []
    rewards = {"r1": 1.0, "r2": 0.0, "r3": 0.0, "r4": 1.0}
    n_calls = {"r1": 5, "r2": 1, "r3": 3, "r4": 1}
    for rid, reward in rewards.items():
        rollout, attempts = _rollout(rid, group="task-7")
        aid = attempts[0].attempt_id
        spans = [_llm(i + 1, rid, aid) for i in range(n_calls[rid])] + [_reward(99, reward, True, rid, aid)]
        results.append(build_transitions(rollout, attempts, spans))
    transitions = assign_advantages(results, CreditConfig())
    assert len(transitions) == 10
    by_rollout: dict[str, set[float]] = {}
    for t in transitions:
        by_rollout.setdefault(t.rollout_id, set()).add(round(t.advantage, 5))
    # Long r1 (5 calls) does not shift the statistics: mean 0.5, std 0.5.
    assert by_rollout == {"r1": {1.0}, "r2": {-1.0}, "r3": {-1.0}, "r4": {1.0}}


def test_group_key_from_metadata_or_input_hash() -> None:
    a = Rollout(rollout_id="x", input={"q": 1, "z": [1, 2]})
    b = Rollout(rollout_id="y", input={"z": [1, 2], "q": 1})
    c = Rollout(rollout_id="z", input={"q": 2})
    assert group_key(a) == group_key(b) != group_key(c)
    assert group_key(Rollout(rollout_id="w", input=1, metadata={"group_id": "G"})) == "G"


def test_missing_reward_policy() -> None:
    rollout, attempts = _rollout()
    res = build_transitions(rollout, attempts, [_llm(1)], credit=CreditConfig(missing_reward=-1.0))
    assert res.transitions[0].return_ == -1.0
    dropped = build_transitions(rollout, attempts, [_llm(1)], credit=CreditConfig(missing_reward=None))
    assert dropped.transitions == [] and dropped.rollout_return is None
    assert [s.reason.value for s in dropped.report] == ["no_reward"]


def test_non_finite_reward_ignored() -> None:
    rollout, attempts = _rollout()
    res = build_transitions(rollout, attempts, [_llm(1), _reward(2, math.nan, True), _reward(3, 0.5, True)])
    assert res.rollout_return == 0.5
