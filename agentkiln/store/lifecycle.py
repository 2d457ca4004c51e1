"""Pure lifecycle rules of rollouts and attempts, shared by every store backend.

Backends load the current rows, call one of these functions and persist what it
returns. Keeping the rules here (no I/O, no clocks: `now` is always passed in) is what
keeps the memory, SQLite and HTTP stores from drifting apart.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agentkiln.models import (
    MAX_ATTRIBUTES_BYTES,
    MAX_INPUT_BYTES,
    MAX_OFFSET,
    Attempt,
    AttemptError,
    AttemptStatus,
    FailureKind,
    Rollout,
    RolloutConfig,
    RolloutMode,
    RolloutStatus,
    Span,
    SpanIn,
    Worker,
    WorkerStatus,
    new_id,
)
from agentkiln.store import json_text
from agentkiln.store.base import InvalidTransitionError, ValidationError

log = logging.getLogger(__name__)

R = RolloutStatus
A = AttemptStatus

# Manual moves allowed through update_rollout. running is reached only via dequeue /
# start_rollout (it needs an attempt); finished statuses are final. Setting the current
# status again is always a no-op (so cancelling twice is fine).
ROLLOUT_TRANSITIONS: dict[RolloutStatus, frozenset[RolloutStatus]] = {
    R.queuing: frozenset({R.cancelled, R.failed}),
    R.requeuing: frozenset({R.queuing, R.cancelled, R.failed}),
    R.running: frozenset({R.succeeded, R.failed, R.cancelled, R.queuing, R.requeuing}),
    R.succeeded: frozenset(),
    R.failed: frozenset(),
    R.cancelled: frozenset(),
}

# Default error kind for attempt statuses that imply one.
_DEFAULT_KIND = {
    A.timeout: FailureKind.timeout,
    A.unresponsive: FailureKind.unresponsive,
    A.cancelled: FailureKind.cancelled,
}


@dataclass(frozen=True)
class Change:
    """New states to persist; None means that object is unchanged."""

    rollout: Rollout | None = None
    attempt: Attempt | None = None


# --------------------------------------------------------------------------- validation


def dump_json(value: Any, *, limit: int, what: str) -> str:
    """Serialise a user value, rejecting what no backend could store (so all backends agree)."""
    try:
        text = json_text.dumps(value)  # json.dumps(value, separators=(",", ":")), faster
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{what} is not JSON-serialisable: {exc}") from exc
    if len(text) > limit:
        raise ValidationError(f"{what} is {len(text)} bytes, above the limit of {limit}")
    return text


def check_page(limit: int, offset: int) -> None:
    if limit < 0 or offset < 0:
        raise ValidationError(f"limit and offset must be >= 0 (got limit={limit}, offset={offset})")
    if offset > MAX_OFFSET:
        raise ValidationError(f"offset must be <= {MAX_OFFSET} (got {offset})")


# --------------------------------------------------------------------------- creation


def new_rollout(
    input: Any,
    *,
    mode: RolloutMode | None,
    resources_id: str | None,
    config: RolloutConfig | None,
    metadata: dict[str, Any] | None,
    now: float,
) -> Rollout:
    """A queuing rollout; input/metadata are normalised through JSON like every backend stores them."""
    input_norm = json.loads(dump_json(input, limit=MAX_INPUT_BYTES, what="rollout input"))
    meta_norm = json.loads(dump_json(metadata or {}, limit=MAX_INPUT_BYTES, what="rollout metadata"))
    return Rollout(
        rollout_id=new_id("ro"),
        input=input_norm,
        mode=mode,
        resources_id=resources_id,
        config=config if config is not None else RolloutConfig(),
        metadata=meta_norm,
        created_at=now,
    )


def start_attempt(rollout: Rollout, worker_id: str | None, now: float) -> Change:
    """Hand a waiting rollout to a runner: rollout -> running with a fresh running attempt."""
    if not rollout.status.waiting:
        raise InvalidTransitionError(f"rollout {rollout.rollout_id} is {rollout.status.value}, not waiting")
    n = rollout.num_attempts + 1
    attempt = Attempt(
        attempt_id=new_id("at"),
        rollout_id=rollout.rollout_id,
        sequence_id=n,
        worker_id=worker_id,
        status=A.running,
        start_time=now,
        last_heartbeat=now,
    )
    new = rollout.model_copy(
        update={
            "status": R.running,
            "num_attempts": n,
            "start_time": rollout.start_time if rollout.start_time is not None else now,
            "end_time": None,
        }
    )
    return Change(rollout=new, attempt=attempt)


# --------------------------------------------------------------------------- rollout updates


def check_rollout_transition(rollout_id: str, current: RolloutStatus, new: RolloutStatus) -> None:
    """Raise InvalidTransitionError unless update_rollout may move `current` to `new`."""
    if new == current or new in ROLLOUT_TRANSITIONS[current]:
        return
    if current.finished:
        why = f"{current.value} is final"
    elif new == R.running:
        why = "a rollout becomes running only through dequeue_rollout/start_rollout"
    else:
        why = f"allowed from {current.value}: {sorted(s.value for s in ROLLOUT_TRANSITIONS[current]) or 'nothing'}"
    raise InvalidTransitionError(f"rollout {rollout_id}: cannot go {current.value} -> {new.value} ({why})")


def update_rollout(
    rollout: Rollout,
    latest: Attempt | None,
    *,
    status: RolloutStatus | None = None,
    mode: RolloutMode | None = None,
    resources_id: str | None = None,
    config: RolloutConfig | None = None,
    metadata: dict[str, Any] | None = None,
    now: float,
) -> Change:
    """Field updates plus a manual status move; a live latest attempt is ended with the rollout."""
    fields: dict[str, Any] = {}
    if mode is not None:
        fields["mode"] = mode
    if resources_id is not None:
        fields["resources_id"] = resources_id
    if config is not None:
        fields["config"] = config
    if metadata is not None:
        fields["metadata"] = json.loads(dump_json(metadata, limit=MAX_INPUT_BYTES, what="rollout metadata"))
    attempt: Attempt | None = None
    if status is not None and status != rollout.status:
        check_rollout_transition(rollout.rollout_id, rollout.status, status)
        fields["status"] = status
        fields["end_time"] = now if status.finished else None
        if latest is not None and not latest.status.finished:
            attempt = _end_live_attempt(latest, status, now)
    return Change(rollout=rollout.model_copy(update=fields), attempt=attempt)


def _end_live_attempt(attempt: Attempt, rollout_status: RolloutStatus, now: float) -> Attempt:
    """The runner's attempt cannot outlive a manual move of its rollout; later updates to it get 409."""
    if rollout_status == R.succeeded:
        return attempt.model_copy(update={"status": A.succeeded, "end_time": now})
    if rollout_status == R.failed:
        return attempt.model_copy(update={"status": A.failed, "end_time": now})
    reason = "rollout cancelled" if rollout_status == R.cancelled else f"rollout moved to {rollout_status.value}"
    error = AttemptError(kind=FailureKind.cancelled, message=reason)
    return attempt.model_copy(update={"status": A.cancelled, "end_time": now, "error": error})


# --------------------------------------------------------------------------- attempt outcomes


def rollout_outcome(rollout: Rollout, attempt: Attempt) -> RolloutStatus:
    """What a finished (or unresponsive) attempt means for its rollout, per the retry policy."""
    if attempt.status == A.succeeded:
        return R.succeeded
    if attempt.status == A.cancelled:
        return R.cancelled
    kind = attempt.error.kind if attempt.error is not None else None
    if kind is not None and kind in rollout.config.retry_on and rollout.num_attempts < rollout.config.max_attempts:
        return R.requeuing
    return R.failed


def _settle(rollout: Rollout, attempt: Attempt, is_latest: bool, now: float) -> Rollout | None:
    """Move the rollout after its attempt ended; only the latest attempt of a live rollout counts."""
    if not is_latest or rollout.status not in (R.running, R.requeuing):
        return None
    status = rollout_outcome(rollout, attempt)
    if status == rollout.status:
        return None
    log.debug(
        "rollout %s: %s -> %s (attempt %s %s)",
        rollout.rollout_id,
        rollout.status.value,
        status.value,
        attempt.attempt_id,
        attempt.status.value,
    )
    return rollout.model_copy(update={"status": status, "end_time": now if status.finished else None})


def check_accepts_new_spans(attempt: Attempt) -> None:
    """A finished attempt's record is closed: new spans are a conflict (re-sent ones still come back as stored)."""
    if attempt.status.finished:
        raise InvalidTransitionError(
            f"attempt {attempt.attempt_id} of rollout {attempt.rollout_id} is already {attempt.status.value}; "
            "it takes no new spans"
        )


def place_spans(
    records: Sequence[dict[str, Any]],
    known: dict[tuple[str, str, str], Span],
    owners: dict[tuple[str, str], tuple[Rollout | None, Attempt, int]],
) -> tuple[list[Span], list[tuple[int, dict[str, Any], int, int]]]:
    """Number a batch of span records the way every database backend stores them.

    `known` holds the spans already stored by (rollout_id, attempt_id, span_id); `owners` each
    owner attempt's (rollout, attempt, last sequence id), advanced here. Returns every span as it
    is (re-sent ones as first stored) and, for each new one, (index in `records`, record, attempt
    sequence id, span sequence id) to insert. Raises before anything is placed if a new span's
    attempt is finished.
    """
    out: list[Span] = []
    fresh: list[tuple[int, dict[str, Any], int, int]] = []
    for i, rec in enumerate(records):
        span_key = (rec["rollout_id"], rec["attempt_id"], rec["span_id"])
        span = known.get(span_key)
        if span is not None:  # re-sent, or repeated in this batch
            out.append(span.model_copy(deep=True))
            continue
        rollout, attempt, last = owners[span_key[:2]]
        check_accepts_new_spans(attempt)  # before anything of the batch is written
        owners[span_key[:2]] = (rollout, attempt, last + 1)
        span = known[span_key] = Span.model_validate({**rec, "sequence_id": last + 1})
        out.append(span)
        fresh.append((i, rec, attempt.sequence_id, last + 1))
    if len(fresh) < len(records):
        log.info("ignoring %d re-sent span(s)", len(records) - len(fresh))
    return out, fresh


def record_activity(rollout: Rollout | None, attempt: Attempt, is_latest: bool, now: float) -> Change:
    """A heartbeat or span: refresh the attempt and revive it if it was unresponsive and still owns the rollout.

    The rollout is only read to revive an unresponsive attempt; callers may skip loading it otherwise.
    """
    if attempt.status.finished:
        return Change()
    updated = attempt.model_copy(update={"last_heartbeat": max(attempt.last_heartbeat, now)})
    if attempt.status != A.unresponsive:
        return Change(attempt=updated)
    if rollout is None:
        raise ValueError("reviving an unresponsive attempt needs its rollout")
    if is_latest and rollout.status in (R.running, R.requeuing):
        log.info("attempt %s of rollout %s is alive again", attempt.attempt_id, rollout.rollout_id)
        revived = updated.model_copy(update={"status": A.running, "error": None, "end_time": None})
        new_rollout_ = rollout.model_copy(update={"status": R.running, "end_time": None})
        return Change(rollout=new_rollout_, attempt=revived)
    log.debug(
        "stale attempt %s (rollout %s is %s) stays unresponsive",
        attempt.attempt_id,
        rollout.rollout_id,
        rollout.status.value,
    )
    return Change(attempt=updated)


def update_attempt(
    rollout: Rollout,
    attempt: Attempt,
    is_latest: bool,
    *,
    status: AttemptStatus | None = None,
    worker_id: str | None = None,
    error: AttemptError | None = None,
    now: float,
) -> Change:
    """A runner's update: heartbeat (status None/running) or finish; returns what changed."""
    if attempt.status.finished:
        raise InvalidTransitionError(
            f"attempt {attempt.attempt_id} of rollout {rollout.rollout_id} is already {attempt.status.value}"
        )
    fields: dict[str, Any] = {}
    if worker_id is not None:
        fields["worker_id"] = worker_id
    if error is not None:
        fields["error"] = error
    base = attempt.model_copy(update=fields) if fields else attempt
    if status is None or status == A.running:
        change = record_activity(rollout, base, is_latest, now)
        return Change(rollout=change.rollout, attempt=change.attempt or base)
    if status == A.unresponsive and attempt.status == A.unresponsive:
        return Change(attempt=base)
    ended = _mark(base, status, now)
    return Change(rollout=_settle(rollout, ended, is_latest, now), attempt=ended)


def _mark(attempt: Attempt, status: AttemptStatus, now: float, message: str = "") -> Attempt:
    """Attempt in a new non-running status, with the error kind that status implies if none was given."""
    error = attempt.error
    if error is None and status in _DEFAULT_KIND:
        error = AttemptError(kind=_DEFAULT_KIND[status], message=message)
    return attempt.model_copy(
        update={
            "status": status,
            "error": error,
            "end_time": now if status.finished else None,
            "last_heartbeat": attempt.last_heartbeat if status == A.unresponsive else max(attempt.last_heartbeat, now),
        }
    )


def sweep_attempt(rollout: Rollout, attempt: Attempt, is_latest: bool, now: float) -> Change | None:
    """Timeout / unresponsive detection for one running attempt; None if it is fine."""
    if attempt.status != A.running:
        return None
    cfg = rollout.config
    if cfg.timeout_s is not None and now - attempt.start_time > cfg.timeout_s:
        msg = f"attempt ran {now - attempt.start_time:.1f}s, above timeout_s={cfg.timeout_s}"
        ended = _mark(attempt.model_copy(update={"error": None}), A.timeout, now, msg)
    elif cfg.unresponsive_s is not None and now - attempt.last_heartbeat > cfg.unresponsive_s:
        msg = f"no heartbeat or span for {now - attempt.last_heartbeat:.1f}s, above unresponsive_s={cfg.unresponsive_s}"
        ended = _mark(attempt.model_copy(update={"error": None}), A.unresponsive, now, msg)
    else:
        return None
    log.info("attempt %s of rollout %s: %s", attempt.attempt_id, rollout.rollout_id, ended.error.message)
    return Change(rollout=_settle(rollout, ended, is_latest, now), attempt=ended)


# --------------------------------------------------------------------------- spans


def span_record(span: SpanIn) -> dict[str, Any]:
    """A producer's span as plain JSON data (what every backend stores), size-checked."""
    return span_record_and_attributes_json(span)[0]


def span_record_and_attributes_json(span: SpanIn) -> tuple[dict[str, Any], str]:
    """span_record plus its attributes as JSON text (the size check serialises them anyway)."""
    try:
        data = span.model_dump(mode="json")
    except Exception as exc:  # pydantic raises its own serialisation error types
        raise ValidationError(f"span {span.name!r} is not JSON-serialisable: {exc}") from exc
    text = dump_json(data["attributes"], limit=MAX_ATTRIBUTES_BYTES, what=f"attributes of span {span.name!r}")
    return data, text


# --------------------------------------------------------------------------- workers


def worker_heartbeat(
    worker: Worker,
    *,
    status: WorkerStatus | None,
    current_rollout_id: str | None,
    current_attempt_id: str | None,
    metadata: dict[str, Any] | None,
    now: float,
) -> Worker:
    """None keeps a field; going idle/stopped clears the current rollout/attempt unless new ones are given."""
    fields: dict[str, Any] = {"last_heartbeat": now}
    if status is not None:
        fields["status"] = status
        if status in (WorkerStatus.idle, WorkerStatus.stopped):
            fields["current_rollout_id"] = None
            fields["current_attempt_id"] = None
    if current_rollout_id is not None:
        fields["current_rollout_id"] = current_rollout_id
    if current_attempt_id is not None:
        fields["current_attempt_id"] = current_attempt_id
    if metadata is not None:
        fields["metadata"] = json.loads(dump_json(metadata, limit=MAX_INPUT_BYTES, what="worker metadata"))
    return worker.model_copy(update=fields)
