"""Turn one rollout's spans into training transitions, and say why any LLM call was left out.

Only the spans of the rollout's latest attempt count, and only when that attempt succeeded:
a requeued rollout has the spans of its failed or unresponsive attempts in the store too,
and training on them as well would count the same task twice. Every LLM call that does
not become (part of) a transition is listed in the report with a reason, so "why did my
agent not learn" can be answered from data.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from agentkiln.adapter.credit import (
    CreditConfig,
    RewardEvent,
    assign_advantages,
    final_reward,
    group_key,
    returns_to_go,
    reward_events,
    step_rewards,
)
from agentkiln.adapter.signals import RewardSignals, RolloutRecord, feedback_targets
from agentkiln.models import Attempt, AttemptStatus, Feedback, Rollout, Span, Transition
from agentkiln.protocol import LLMCall, SpanNames

log = logging.getLogger(__name__)


class SkipReason(str, Enum):
    no_token_ids = "no_token_ids"  # the engine did not return token ids (e.g. upstream without them)
    no_logprobs = "no_logprobs"
    bad_logprobs = "bad_logprobs"  # length differs from the response or non-finite values
    empty_prompt = "empty_prompt"
    empty_response = "empty_response"
    agent_not_selected = "agent_not_selected"
    truncated = "truncated"  # finish_reason "length" and keep_truncated=False
    failed_attempt = "failed_attempt"  # span of an attempt that failed / timed out / was cancelled
    stale_attempt = "stale_attempt"  # span of an attempt superseded by a later one (or unknown attempt)
    unfinished_attempt = "unfinished_attempt"  # the latest attempt is still running / unresponsive
    no_reward = "no_reward"  # no reward span and CreditConfig.missing_reward is None
    # sampled with settings the learner does not reproduce (top_k, min_p): its log-probs would not match
    unreproducible_sampling = "unreproducible_sampling"


@dataclass(frozen=True)
class SkippedCall:
    rollout_id: str
    attempt_id: str
    sequence_id: int
    reason: SkipReason
    agent: str | None = None
    detail: str = ""


@dataclass
class AdapterResult:
    """Transitions of one rollout plus the skip report; `rollout_return` feeds the group advantage."""

    rollout_id: str
    group_id: str
    attempt_id: str | None = None
    rollout_return: float | None = None
    transitions: list[Transition] = field(default_factory=list)
    report: list[SkippedCall] = field(default_factory=list)


@dataclass
class _Call:
    """One selected LLM call (or several merged ones) on its way to a Transition."""

    sequence_id: int
    agent: str | None
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    mask: list[int]
    model_version: str | None
    temperature: float | None = None  # the call's own sampling settings (None: not recorded)
    top_p: float | None = None


def latest_attempt(rollout: Rollout, attempts: Iterable[Attempt]) -> Attempt | None:
    """The rollout's most recent attempt (highest sequence id): the only one training counts."""
    own = [a for a in attempts if a.rollout_id == rollout.rollout_id]
    return max(own, key=lambda a: a.sequence_id) if own else None


def _reason_for_other_attempt(attempt: Attempt | None) -> SkipReason:
    if attempt is not None and attempt.status in (AttemptStatus.failed, AttemptStatus.timeout, AttemptStatus.cancelled):
        return SkipReason.failed_attempt
    return SkipReason.stale_attempt


def _check_call(
    span: Span, rec: LLMCall, agent_re: re.Pattern[str] | None, keep_truncated: bool
) -> tuple[_Call | None, SkipReason | None, str]:
    agent = rec.agent
    if agent_re is not None and (agent is None or agent_re.search(agent) is None):
        return None, SkipReason.agent_not_selected, f"agent {agent!r}"
    prompt, response, logprobs = rec.prompt_ids, rec.response_ids, rec.logprobs
    if prompt is None or response is None:
        return None, SkipReason.no_token_ids, ""
    if not prompt:
        return None, SkipReason.empty_prompt, ""
    if not response:
        return None, SkipReason.empty_response, ""
    if not rec.logprobs_valid:
        return None, SkipReason.bad_logprobs, "not numbers"
    if logprobs is None:
        return None, SkipReason.no_logprobs, ""
    if len(logprobs) != len(response) or not all(math.isfinite(x) for x in logprobs):
        return None, SkipReason.bad_logprobs, f"{len(logprobs)} logprobs for {len(response)} tokens"
    if rec.finish_reason == "length" and not keep_truncated:
        return None, SkipReason.truncated, ""
    unreproducible = [
        f"{name}={value}"
        for name, value, off in (("top_k", rec.top_k, (0, -1)), ("min_p", rec.min_p, (0.0,)))
        if value is not None and value not in off
    ]
    if unreproducible:  # the learner takes log-probs under temperature (and top_p as the engine records) only
        return None, SkipReason.unreproducible_sampling, ", ".join(unreproducible)
    version = rec.model_version
    call = _Call(
        sequence_id=span.sequence_id,
        agent=agent,
        prompt_ids=prompt,
        response_ids=response,
        logprobs=logprobs,
        mask=[1] * len(response),
        model_version=version,
        temperature=rec.temperature,
        top_p=rec.top_p,
    )
    return call, None, ""


def _merge(calls: Sequence[_Call]) -> list[_Call]:
    """Merge call k+1 into call k when its prompt continues k's prompt + response (same agent).

    The tokens between (tool results, the next user turn, template markup) join the response
    with mask 0 and logprob 0: they are context the model did not sample, so no gradient.
    """
    merged: list[_Call] = []
    for call in calls:
        if merged:
            cur = merged[-1]
            history = cur.prompt_ids + cur.response_ids
            if (
                cur.agent == call.agent
                and (cur.temperature, cur.top_p) == (call.temperature, call.top_p)  # one setting per transition
                and len(call.prompt_ids) >= len(history)
                and call.prompt_ids[: len(history)] == history
            ):
                inserted = call.prompt_ids[len(history) :]
                cur.response_ids = cur.response_ids + inserted + call.response_ids
                cur.logprobs = cur.logprobs + [0.0] * len(inserted) + call.logprobs
                cur.mask = cur.mask + [0] * len(inserted) + call.mask
                continue
        merged.append(
            _Call(
                call.sequence_id,
                call.agent,
                list(call.prompt_ids),
                list(call.response_ids),
                list(call.logprobs),
                list(call.mask),
                call.model_version,
                call.temperature,
                call.top_p,
            )
        )
    return merged


def build_transitions(
    rollout: Rollout,
    attempts: Iterable[Attempt],
    spans: Iterable[Span],
    *,
    agent_match: str | None = None,
    credit: CreditConfig | None = None,
    merge: bool = False,
    keep_truncated: bool = True,
    signals: RewardSignals | None = None,
    feedback: Sequence[Feedback] = (),
) -> AdapterResult:
    """Transitions (one per selected LLM call, in sequence order; `done` on the last) of one rollout.

    agent_match: regex searched in the agent name (anchor it with ^...$ for an exact match);
        None selects every call, including calls without an agent name.
    merge: fold calls whose token history continues the previous call into one transition.
    keep_truncated: keep calls that stopped at max_tokens (their reward usually says enough);
        False drops them with reason "truncated".
    Returns/advantages: `reward` is the step's immediate reward, `return_` the credit-assigned
    return; `advantage` stays 0 until `credit.assign_advantages` sees the whole group.
    signals: built-in reward signals composed with the agent's reward (adapter/signals.py; None or
        the default: rewards as emitted); `feedback` holds users' feedback for its `feedback` signal.
    """
    credit = credit or CreditConfig()
    attempts = list(attempts)
    by_id = {a.attempt_id: a for a in attempts}
    chosen = latest_attempt(rollout, attempts)
    result = AdapterResult(rollout_id=rollout.rollout_id, group_id=group_key(rollout))
    usable = chosen is not None and chosen.status == AttemptStatus.succeeded
    if usable:
        result.attempt_id = chosen.attempt_id

    agent_re = re.compile(agent_match) if agent_match is not None else None
    own_spans: list[Span] = []
    for span in sorted(spans, key=lambda s: (s.sequence_id, s.start_time)):
        if span.rollout_id != rollout.rollout_id:
            continue
        if usable and span.attempt_id == chosen.attempt_id:
            own_spans.append(span)
            continue
        if span.name != SpanNames.llm_call:
            continue
        if chosen is not None and span.attempt_id == chosen.attempt_id:
            reason = SkipReason.unfinished_attempt if not chosen.status.finished else SkipReason.failed_attempt
        else:
            reason = _reason_for_other_attempt(by_id.get(span.attempt_id))
        result.report.append(
            SkippedCall(
                rollout.rollout_id, span.attempt_id, span.sequence_id, reason, LLMCall.agent_of(span)
            )
        )
    if not usable:
        return result

    events: list[RewardEvent] = reward_events(own_spans, credit.reward_name)
    if not events and credit.missing_reward is not None:
        events = [RewardEvent(sequence_id=1 << 62, value=float(credit.missing_reward), final=True)]
    if signals is not None and signals.enabled and events:
        events = signals.compose(events, RolloutRecord(rollout, chosen, attempts, own_spans, feedback))

    calls: list[_Call] = []
    for span in own_spans:
        if span.name != SpanNames.llm_call:
            continue
        rec = LLMCall.from_span(span)
        call, reason, detail = _check_call(span, rec, agent_re, keep_truncated)
        if call is None:
            assert reason is not None
            result.report.append(
                SkippedCall(
                    rollout.rollout_id,
                    span.attempt_id,
                    span.sequence_id,
                    reason,
                    rec.agent,
                    detail,
                )
            )
        else:
            calls.append(call)

    if not events:
        result.report.extend(
            SkippedCall(rollout.rollout_id, chosen.attempt_id, c.sequence_id, SkipReason.no_reward, c.agent)
            for c in calls
        )
        return result

    steps = _merge(calls) if merge else calls
    rewards = step_rewards([c.sequence_id for c in steps], events)
    if credit.mode == "final":
        total = final_reward(events)
        assert total is not None
        returns = [total] * len(steps)
        result.rollout_return = total
    else:
        returns = returns_to_go(rewards, credit.gamma)
        # With no trained calls the rollout's score is still a sample of its task for the group.
        result.rollout_return = returns[0] if returns else final_reward(events)

    for i, (c, r, g) in enumerate(zip(steps, rewards, returns)):
        result.transitions.append(
            Transition(
                rollout_id=rollout.rollout_id,
                attempt_id=chosen.attempt_id,
                agent=c.agent,
                step=i,
                prompt_ids=c.prompt_ids,
                response_ids=c.response_ids,
                logprobs=c.logprobs,
                response_mask=c.mask,
                reward=r,
                return_=g,
                done=i == len(steps) - 1,
                group_id=result.group_id,
                model_version=c.model_version,
                temperature=c.temperature,
                top_p=c.top_p,
            )
        )
    if result.report:
        log.debug("rollout %s: %d calls skipped", rollout.rollout_id, len(result.report))
    return result


def build_batch(
    items: Iterable[tuple[Rollout, Sequence[Attempt], Sequence[Span]]],
    *,
    agent_match: str | None = None,
    credit: CreditConfig | None = None,
    merge: bool = False,
    keep_truncated: bool = True,
    signals: RewardSignals | None = None,
    feedback: Sequence[Feedback] = (),
) -> tuple[list[Transition], list[SkippedCall]]:
    """Adapt many rollouts and assign GRPO advantages across their groups in one go (`signals`,
    `feedback`: see build_transitions)."""
    credit = credit or CreditConfig()
    on: dict[str, list[Feedback]] = {}
    for fb in feedback:
        for rid in feedback_targets(fb):
            on.setdefault(rid, []).append(fb)
    results = [
        build_transitions(
            r,
            a,
            s,
            agent_match=agent_match,
            credit=credit,
            merge=merge,
            keep_truncated=keep_truncated,
            signals=signals,
            feedback=on.get(r.rollout_id, ()),
        )
        for r, a, s in items
    ]
    transitions = assign_advantages(results, credit)
    report = [skip for res in results for skip in res.report]
    return transitions, report
