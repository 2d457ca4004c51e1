"""Built-in reward signals (adapter/signals.py): each formula on hand-made spans, composition, default off."""

from __future__ import annotations

import pytest

from agentkiln.adapter.credit import CreditConfig
from agentkiln.adapter.signals import (
    RewardSignals,
    failure_kinds,
    failure_penalty,
    feedback_score,
    latency_penalty,
    task_completion,
    tool_success,
    user_feedback,
)
from agentkiln.adapter.transitions import build_batch
from agentkiln.models import (
    Attempt,
    AttemptError,
    AttemptStatus,
    FailureKind,
    Feedback,
    Rollout,
    Span,
    SpanStatus,
)
from agentkiln.protocol import SpanAttrs, SpanNames, session_rollout_id

_seq = iter(range(1, 10_000))


def span(name: str, *, rid: str = "r1", aid: str = "a2", error: bool = False, **attrs) -> Span:
    return Span(rollout_id=rid, attempt_id=aid, name=name, sequence_id=next(_seq), attributes=attrs,
                status=SpanStatus(code="ERROR" if error else "UNSET"))  # fmt: skip


def llm(latency: float | None = None, *, rid: str = "r1", **attrs) -> Span:
    extra = {SpanAttrs.latency_s: latency} if latency is not None else {}
    return span(SpanNames.llm_call, rid=rid, **{
        SpanAttrs.prompt_token_ids: [1, 2], SpanAttrs.response_token_ids: [3], SpanAttrs.response_logprobs: [-0.5],
        SpanAttrs.model_version: "v1", **extra, **attrs})  # fmt: skip


def reward(value: float, *, final: bool = True, rid: str = "r1") -> Span:
    return span(SpanNames.reward, rid=rid, **{SpanAttrs.reward_value: value, SpanAttrs.reward_final: final})


def tool(ok: bool) -> Span:
    if ok:
        return span(SpanNames.tool, **{SpanAttrs.tool_name: "calc"})
    return span(SpanNames.tool, error=True, **{SpanAttrs.tool_name: "calc", SpanAttrs.failure_kind: "tool_error"})


def attempt(status: AttemptStatus = AttemptStatus.succeeded, kind: FailureKind | None = None, *, aid: str = "a2",
            seq: int = 2, rid: str = "r1") -> Attempt:  # fmt: skip
    error = AttemptError(kind=kind, message="x") if kind is not None else None
    return Attempt(attempt_id=aid, rollout_id=rid, sequence_id=seq, status=status, error=error)


def feedback(value, *, rid: str | None = "r1", session: str | None = None, name: str = "user") -> Feedback:
    target = {"session_id": session} if session is not None else {"response_id": "chatcmpl-1"}
    return Feedback(feedback_id=f"fb-{next(_seq)}", rollout_id=rid, name=name, value=value, **target)


def test_task_completion() -> None:
    """1 if the attempt succeeded and its own final reward (if any) is > 0, else 0."""
    assert task_completion(attempt(), [llm()]) == 1.0  # no reward emitted: success is completion
    assert task_completion(attempt(), [reward(0.7)]) == 1.0
    assert task_completion(attempt(), [reward(0.0)]) == 0.0
    assert task_completion(attempt(), [reward(-1.0)]) == 0.0
    assert task_completion(attempt(AttemptStatus.failed, FailureKind.loop), [reward(1.0)]) == 0.0
    assert task_completion(None, []) == 0.0


def test_tool_success() -> None:
    """ok / total over kiln.tool spans; 1 with none; an unrecorded tool failure of the attempt counts once."""
    assert tool_success([tool(True), tool(True), tool(False), llm()]) == pytest.approx(2 / 3)
    assert tool_success([llm()]) == 1.0
    status_only = span(SpanNames.tool, error=True)  # ERROR status without a kind still failed
    assert tool_success([tool(True), status_only]) == 0.5
    failed = attempt(AttemptStatus.failed, FailureKind.tool_timeout)
    assert tool_success([tool(True)], failed) == 0.5  # the tool that timed out left no span
    assert tool_success([tool(True), tool(False)], failed) == 0.5  # already recorded: not twice
    assert tool_success([], failed) == 0.0


def test_latency_penalty() -> None:
    """mean of -min(1, max(0, latency - budget) / budget) over calls with a latency."""
    assert latency_penalty([llm(1.0), llm(2.0)], budget_s=2.0) == 0.0
    assert latency_penalty([llm(3.0)], budget_s=2.0) == -0.5
    assert latency_penalty([llm(10.0)], budget_s=2.0) == -1.0  # clipped
    assert (
        latency_penalty([llm(1.0), llm(3.0), llm(None)], budget_s=2.0) == -0.25
    )  # the call without one is not counted
    assert latency_penalty([tool(True)], budget_s=2.0) == 0.0


def test_user_feedback() -> None:
    """mean of values normalised to [-1, 1]; labels skipped; 0 without any."""
    assert [feedback_score(v) for v in (True, False, 1.0, 0.0, 0.75, 3.0, "meh")] == [1, -1, 1, -1, 0.5, 1, None]
    assert feedback_score(4, scale=(1, 5)) == 0.5
    assert user_feedback([feedback(True), feedback(False), feedback(True), feedback("meh")]) == pytest.approx(1 / 3)
    assert user_feedback([]) == 0.0
    assert user_feedback([feedback(True, name="thumbs"), feedback(False)], names=["thumbs"]) == 1.0


def test_failure_penalty() -> None:
    """-min(1, sum of penalties) over attempts' error kinds, exception spans and unparsed tool calls."""
    attempts = [attempt(AttemptStatus.failed, FailureKind.tool_timeout, aid="a1", seq=1), attempt()]
    spans = [
        span(SpanNames.exception, **{SpanAttrs.failure_kind: "agent_exception"}),
        llm(**{SpanAttrs.parse_error: "no JSON"}),
        tool(False),  # tool_success's business
        llm(),
    ]
    kinds = failure_kinds(attempts, spans)
    assert sorted(kinds) == ["agent_exception", "parse_error", "tool_timeout"]
    assert failure_penalty(kinds) == -(0.25 + 0.25 + 0.5)
    assert failure_penalty(["loop", "parse_error", "loop"]) == -1.0  # clipped
    assert failure_penalty(["unresponsive", "cancelled", "unknown"]) == 0.0
    assert failure_penalty(["loop"], {"loop": 0.2}) == -0.2


def test_short_form_and_validation() -> None:
    signals = RewardSignals.of({"tool_success": 0.2, "latency": 0.1, "user": 0.5})
    assert signals.weights == {"tool_success": 0.2, "latency": 0.1} and signals.user_weight == 0.5
    assert RewardSignals.of(None) is None and RewardSignals.of(signals) is signals
    assert not RewardSignals().enabled and not RewardSignals.of({"latency": 0.0}).enabled
    with pytest.raises(ValueError, match="unknown reward signal"):
        RewardSignals.of({"speed": 1.0})
    with pytest.raises(ValueError, match="latency_budget_s"):
        RewardSignals(latency_budget_s=0)
    with pytest.raises(ValueError, match="feedback_scale"):
        RewardSignals(feedback_scale=(1.0, 1.0))
    import agentkiln as kiln

    assert kiln.GRPO(reward_signals={"tool_success": 0.2}).reward_signals == RewardSignals(
        weights={"tool_success": 0.2}
    )
    assert kiln.RewardSignals is RewardSignals


# --------------------------------------------------------------------------- composed into transitions


def rollout(rid: str, group: str = "g1") -> Rollout:
    return Rollout(rollout_id=rid, input={"task": group}, metadata={"group_id": group})


def traces() -> list[tuple[Rollout, list[Attempt], list[Span]]]:
    """Two rollouts of one task: r1 fast with a failed tool, r2 slow with a working tool; same reward."""
    r1 = [llm(1.0, rid="r1"), tool(True), tool(False), llm(1.0, rid="r1"), reward(1.0, rid="r1")]
    r2 = [llm(6.0, rid="r2"), tool(True), reward(1.0, rid="r2")]
    for s in r2:
        s.rollout_id = "r2"
    return [(rollout("r1"), [attempt()], r1), (rollout("r2"), [attempt(rid="r2")], r2)]


def test_default_leaves_rewards_unchanged() -> None:
    plain, plain_report = build_batch(traces())
    for signals in (None, RewardSignals(), RewardSignals.of({"tool_success": 0.0})):
        composed, report = build_batch(traces(), signals=signals, feedback=[feedback(False)])
        assert [t.model_dump() for t in composed] == [t.model_dump() for t in plain]
        assert report == plain_report
    assert {t.return_ for t in plain} == {1.0} and {t.advantage for t in plain} == {0.0}  # a tie: no signal


def test_composition_in_final_mode() -> None:
    """reward = w_user * R + sum_i w_i * signal_i, broadcast to every call; group advantages follow."""
    signals = RewardSignals(weights={"tool_success": 0.4, "latency": 0.2, "feedback": 0.1}, user_weight=0.5,
                            latency_budget_s=2.0)  # fmt: skip
    fb = [feedback(True, rid="r2"), feedback(True, rid=None, session="s9")]
    transitions, _ = build_batch(traces(), signals=signals, feedback=fb)
    by_rollout = {t.rollout_id: t.return_ for t in transitions}
    # r1: tools 1/2, latency 0 (within budget), no feedback -> 0.5 * 1 + 0.4 * 0.5 + 0 + 0
    assert by_rollout["r1"] == pytest.approx(0.5 + 0.2)
    # r2: tools 1/1, latency -min(1, 4/2) = -1, feedback +1 -> 0.5 + 0.4 - 0.2 + 0.1
    assert by_rollout["r2"] == pytest.approx(0.5 + 0.4 - 0.2 + 0.1)
    r1, r2 = [t for t in transitions if t.rollout_id == "r1"], [t for t in transitions if t.rollout_id == "r2"]
    assert len(r1) == 2 and {t.return_ for t in r1} == {by_rollout["r1"]}
    assert r1[-1].reward == pytest.approx(0.7) and r1[0].reward == 0.0  # the final reward sits on the last step
    assert r1[0].advantage < 0 < r2[0].advantage  # the tie is broken by the signals


def test_composition_of_intermediate_rewards_and_session_feedback() -> None:
    """Intermediate-only rewards: the bonus joins their sum (discounted mode: the last step's reward)."""
    r = Rollout(rollout_id=session_rollout_id("s1"), input={"session_id": "s1"})
    spans = [llm(rid=r.rollout_id), reward(0.25, final=False, rid=r.rollout_id), llm(rid=r.rollout_id),
             reward(0.25, final=False, rid=r.rollout_id)]  # fmt: skip
    for s in spans:
        s.rollout_id = r.rollout_id
    a = attempt(rid=r.rollout_id)
    signals = RewardSignals.of({"feedback": 1.0, "completion": 0.5})
    fb = [feedback(0.0, rid=None, session="s1"), feedback(1.0, rid=None, session="s1"), feedback(True, rid="other")]
    final, _ = build_batch([(r, [a], spans)], signals=signals, feedback=fb)
    assert [t.return_ for t in final] == [pytest.approx(1.0)] * 2  # sum 0.5, feedback mean 0, 0.5 * completion 1
    discounted, _ = build_batch([(r, [a], spans)], credit=CreditConfig(mode="discounted"), signals=signals, feedback=fb)
    assert [t.reward for t in discounted] == [0.25, pytest.approx(0.25 + 0.5)]


def test_missing_reward_is_respected() -> None:
    """No reward and missing_reward=None: the rollout stays out; the signals do not invent a reward."""
    r, spans = rollout("r1"), [llm(1.0), tool(True)]
    signals = RewardSignals.of({"tool_success": 1.0})
    dropped, report = build_batch([(r, [attempt()], spans)], credit=CreditConfig(missing_reward=None), signals=signals)
    assert dropped == [] and [s.reason.value for s in report] == ["no_reward"]
    kept, _ = build_batch([(r, [attempt()], spans)], signals=signals)  # missing_reward 0.0 (default)
    assert kept[0].return_ == 1.0
