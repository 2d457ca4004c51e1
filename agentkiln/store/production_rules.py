"""Pure rules of production records (sessions, feedback, canaries), shared by every store backend.

Like `lifecycle`, nothing here does I/O or reads a clock: backends look rows up, call one of
these functions and persist what it returns, so the memory, SQLite and PostgreSQL stores resolve
feedback targets, default a canary's baseline and refuse a second decision the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from agentkiln.models import (
    MAX_INPUT_BYTES,
    Attempt,
    AttemptStatus,
    Canary,
    CanaryDecision,
    CanaryIn,
    CanaryStatus,
    Feedback,
    FeedbackIn,
    Resources,
    Rollout,
    RolloutConfig,
    RolloutMode,
    RolloutStatus,
    new_id,
)
from agentkiln.protocol import SESSION_ATTEMPT_ID, SpanAttrs, SpanNames, session_rollout_id
from agentkiln.store.base import InvalidTransitionError, NotFoundError, ValidationError
from agentkiln.store.lifecycle import dump_json

# --------------------------------------------------------------------------- sessions

# No timeout, no heartbeat limit, no retries: a session ends only by retention (purge_production).
SESSION_CONFIG = RolloutConfig(timeout_s=None, unresponsive_s=None, max_attempts=1, retry_on=[])


def new_session(session_id: str, metadata: dict[str, Any] | None, now: float) -> tuple[Rollout, Attempt]:
    """The running production rollout and its one long-lived attempt recording `session_id`.

    Backends insert both only if the rollout id is not taken yet (INSERT OR IGNORE / ON CONFLICT
    DO NOTHING), then read back what is stored: concurrent first calls make one session.
    """
    meta = json.loads(dump_json(metadata or {}, limit=MAX_INPUT_BYTES, what="session metadata"))
    rollout_id = session_rollout_id(session_id)
    rollout = Rollout(
        rollout_id=rollout_id,
        input={"session_id": session_id},
        mode=RolloutMode.production,
        status=RolloutStatus.running,
        config=SESSION_CONFIG,
        metadata=meta,
        created_at=now,
        start_time=now,
        num_attempts=1,
    )
    attempt = Attempt(
        attempt_id=SESSION_ATTEMPT_ID,
        rollout_id=rollout_id,
        sequence_id=1,
        worker_id=None,
        status=AttemptStatus.running,
        start_time=now,
        last_heartbeat=now,
    )
    return rollout, attempt


# --------------------------------------------------------------------------- the response-id index


@dataclass(frozen=True)
class CallEntry:
    """One row of the response-id index: which span recorded choice `choice_index` of call `call_id`."""

    call_id: str
    rollout_id: str
    attempt_id: str
    span_id: str
    choice_index: int
    model_version: str | None

    def values(self) -> tuple[Any, ...]:
        return (self.call_id, self.rollout_id, self.attempt_id, self.span_id, self.choice_index, self.model_version)


CALL_COLS = "call_id, rollout_id, attempt_id, span_id, choice_index, model_version"


def _model_version(attributes: dict[str, Any]) -> str | None:
    value = attributes.get(SpanAttrs.model_version)
    return None if value is None else str(value)


def call_entry(record: dict[str, Any]) -> CallEntry | None:
    """The index row of a stored span record (lifecycle.span_record), None unless it is an LLM call with an id."""
    if record.get("name") != SpanNames.llm_call:
        return None
    attributes = record.get("attributes") or {}
    call_id = attributes.get(SpanAttrs.call_id)
    if not isinstance(call_id, str) or not call_id:
        return None
    index = attributes.get(SpanAttrs.choice_index)
    return CallEntry(
        call_id=call_id,
        rollout_id=record["rollout_id"],
        attempt_id=record["attempt_id"],
        span_id=record["span_id"],
        choice_index=index if isinstance(index, int) and not isinstance(index, bool) else 0,
        model_version=_model_version(attributes),
    )


def call_entries(records: Iterable[dict[str, Any]]) -> list[CallEntry]:
    return [entry for entry in map(call_entry, records) if entry is not None]


# --------------------------------------------------------------------------- feedback


@dataclass(frozen=True)
class Target:
    """What a feedback post was resolved to."""

    rollout_id: str
    attempt_id: str | None
    span_id: str | None
    model_version: str | None


def target_of_call(feedback: FeedbackIn, entry: CallEntry | None) -> Target:
    """A response id names the span of that call (backends pass the entry with the lowest choice, then the first)."""
    if entry is None or (feedback.rollout_id is not None and entry.rollout_id != feedback.rollout_id):
        where = f" in rollout {feedback.rollout_id}" if feedback.rollout_id is not None else ""
        raise NotFoundError(f"no recorded LLM call with response id {feedback.response_id!r}{where}")
    return Target(entry.rollout_id, entry.attempt_id, entry.span_id, entry.model_version)


def target_of_span(feedback: FeedbackIn, attempt_id: str | None, attributes: dict[str, Any] | None) -> Target:
    """A span id (with its rollout) names that span; attempt_id None: no such span."""
    if attempt_id is None:
        raise NotFoundError(f"span {feedback.span_id!r} of rollout {feedback.rollout_id!r} not found")
    assert feedback.rollout_id is not None and feedback.span_id is not None
    return Target(feedback.rollout_id, attempt_id, feedback.span_id, _model_version(attributes or {}))


def target_of_session(feedback: FeedbackIn, rollout: Rollout | None, model_version: str | None) -> Target:
    """A session id names its rollout; model_version: the version that served its latest call."""
    assert feedback.session_id is not None
    if rollout is None or (feedback.rollout_id is not None and rollout.rollout_id != feedback.rollout_id):
        raise NotFoundError(f"no recorded session {feedback.session_id!r}")
    return Target(rollout.rollout_id, SESSION_ATTEMPT_ID, None, model_version)


def session_of(feedback: FeedbackIn) -> str | None:
    """The rollout id a session-targeted post names (None for other targets)."""
    return session_rollout_id(feedback.session_id) if feedback.session_id is not None else None


def new_feedback(feedback: FeedbackIn, target: Target, now: float) -> Feedback:
    """The stored record; metadata is normalised through JSON like every backend stores it."""
    meta = json.loads(dump_json(feedback.metadata, limit=MAX_INPUT_BYTES, what="feedback metadata"))
    return Feedback.model_validate(
        {
            **feedback.model_dump(),
            "metadata": meta,
            "rollout_id": target.rollout_id,
            "feedback_id": new_id("fb"),
            "created_at": now,
            "attempt_id": target.attempt_id,
            "resolved_span_id": target.span_id,
            "model_version": target.model_version,
        }
    )


def feedback_filter(*, session_id: str | None, rollout_id: str | None) -> tuple[str | None, bool]:
    """(rollout id to match, whether anything can match): a session's feedback is its rollout's."""
    if session_id is None:
        return rollout_id, True
    wanted = session_rollout_id(session_id)
    if rollout_id is not None and rollout_id != wanted:
        return None, False
    return wanted, True


def feedback_matches(fb: Feedback, *, rollout_id: str | None, response_id: str | None, since: float | None) -> bool:
    """The query filter (in-memory form of the WHERE clause the databases run)."""
    return (
        (rollout_id is None or fb.rollout_id == rollout_id)
        and (response_id is None or fb.response_id == response_id)
        and (since is None or fb.created_at >= since)
    )


def feedback_query_sql(
    data_column: str, *, rollout_id: str | None, response_id: str | None, since: float | None, mark: str
) -> tuple[str, list[Any]]:
    """The databases' feedback page query (`mark`: the driver's placeholder); args end before limit, offset."""
    where, args = [], []
    for column, op, value in (("rollout_id", "=", rollout_id), ("response_id", "=", response_id),
                              ("created_at", ">=", since)):  # fmt: skip
        if value is not None:
            where.append(f"{column} {op} {mark}")
            args.append(value)
    sql = f"SELECT {data_column} FROM feedback" + (" WHERE " + " AND ".join(where) if where else "")
    return sql + f" ORDER BY seq LIMIT {mark} OFFSET {mark}", args


# --------------------------------------------------------------------------- canaries


def new_canary(
    canary: CanaryIn,
    *,
    active: Canary | None,
    candidate: Resources | None,
    baseline: Resources | None,
    now: float,
) -> Canary:
    """A new active canary with its "start" decision.

    Backends pass the active canary (if any), the candidate resources and the baseline: the one
    named, else the latest deployed version (None when the lookup found nothing).
    """
    if active is not None:
        raise InvalidTransitionError(
            f"canary {active.canary_id} is still active: promote or roll it back before starting another"
        )
    if candidate is None:
        raise NotFoundError(f"resources {canary.candidate_resources_id} not found")
    if baseline is None:
        if canary.baseline_resources_id is not None:
            raise NotFoundError(f"resources {canary.baseline_resources_id} not found")
        raise NotFoundError("no deployed resources to compare the candidate with: publish one or name the baseline")
    if baseline.resources_id == candidate.resources_id:
        raise ValidationError("a canary compares two versions: the candidate is the baseline")
    start = CanaryDecision(
        action="start", by="user", at=now, reason=f"candidate v{candidate.version} vs baseline v{baseline.version}"
    )
    return Canary.model_validate(
        {
            **canary.model_dump(),
            "canary_id": new_id("can"),
            "baseline_resources_id": baseline.resources_id,
            "status": CanaryStatus.active,
            "started_at": now,
            "decisions": [start.model_dump()],
        }
    )


_ENDS = {"promote": CanaryStatus.promoted, "rollback": CanaryStatus.rolled_back}


def decide_canary(canary: Canary, decision: CanaryDecision, promoted_resources_id: str | None, now: float) -> Canary:
    """The canary ended by `decision`; InvalidTransitionError unless it is still active (one decider wins)."""
    if decision.action not in _ENDS:
        raise ValidationError(f"a decision ends a canary: promote or rollback, not {decision.action!r}")
    if canary.status != CanaryStatus.active:
        raise InvalidTransitionError(f"canary {canary.canary_id} is already {canary.status.value}")
    if promoted_resources_id is not None and decision.action != "promote":
        raise ValidationError("promoted_resources_id goes with a promote decision only")
    return canary.model_copy(
        update={
            "status": _ENDS[decision.action],
            "ended_at": now,
            "promoted_resources_id": promoted_resources_id,
            "decisions": [*canary.decisions, decision],
        },
        deep=True,
    )
