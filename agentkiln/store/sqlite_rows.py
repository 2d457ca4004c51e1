"""Conversion between SQLite rows and store models; nested fields are stored as compact JSON text.

Each *_COLS string fixes the column order that the matching row/values function relies on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from agentkiln.models import (
    Attempt,
    AttemptError,
    AttemptStatus,
    Resources,
    Rollout,
    RolloutConfig,
    RolloutMode,
    RolloutStatus,
    Span,
    Worker,
    WorkerStatus,
)
from agentkiln.store import json_text

R_COLS = (
    "rollout_id, status, mode, input, resources_id, config, metadata, created_at, start_time, end_time, num_attempts"
)
A_COLS = "attempt_id, rollout_id, sequence_id, worker_id, status, start_time, end_time, last_heartbeat, error"
S_COLS = (
    "rollout_id, attempt_id, sequence_id, name, trace_id, span_id, parent_id, start_time, end_time, "
    "attributes, events, status, resource"
)
# What add_spans writes: S_COLS plus attempt_seq, which orders spans across attempts.
S_INSERT_COLS = (
    "rollout_id, attempt_id, attempt_seq, sequence_id, name, trace_id, span_id, parent_id, start_time, end_time, "
    "attributes, events, status, resource"
)
RES_COLS = "resources_id, version, created_at, llms, prompts, metadata, candidate"
W_COLS = "worker_id, status, last_heartbeat, current_rollout_id, current_attempt_id, metadata"


def dumps(value: Any) -> str:
    return json_text.dumps(value)  # json.dumps(value, separators=(",", ":")), at orjson speed


def rollout_from_row(row: Sequence[Any]) -> Rollout:
    return Rollout(
        rollout_id=row[0],
        status=RolloutStatus(row[1]),
        mode=RolloutMode(row[2]) if row[2] is not None else None,
        input=json.loads(row[3]),
        resources_id=row[4],
        config=RolloutConfig.model_validate_json(row[5]),
        metadata=json.loads(row[6]),
        created_at=row[7],
        start_time=row[8],
        end_time=row[9],
        num_attempts=row[10],
    )


def rollout_values(r: Rollout) -> tuple[Any, ...]:
    return (
        r.rollout_id,
        r.status.value,
        r.mode.value if r.mode is not None else None,
        dumps(r.input),
        r.resources_id,
        r.config.model_dump_json(),
        dumps(r.metadata),
        r.created_at,
        r.start_time,
        r.end_time,
        r.num_attempts,
    )


def attempt_from_row(row: Sequence[Any]) -> Attempt:
    return Attempt(
        attempt_id=row[0],
        rollout_id=row[1],
        sequence_id=row[2],
        worker_id=row[3],
        status=AttemptStatus(row[4]),
        start_time=row[5],
        end_time=row[6],
        last_heartbeat=row[7],
        error=AttemptError.model_validate_json(row[8]) if row[8] is not None else None,
    )


def attempt_values(a: Attempt) -> tuple[Any, ...]:
    return (
        a.attempt_id,
        a.rollout_id,
        a.sequence_id,
        a.worker_id,
        a.status.value,
        a.start_time,
        a.end_time,
        a.last_heartbeat,
        a.error.model_dump_json() if a.error is not None else None,
    )


def span_from_row(row: Sequence[Any]) -> Span:
    return Span.model_validate(
        {
            "rollout_id": row[0],
            "attempt_id": row[1],
            "sequence_id": row[2],
            "name": row[3],
            "trace_id": row[4],
            "span_id": row[5],
            "parent_id": row[6],
            "start_time": row[7],
            "end_time": row[8],
            "attributes": json.loads(row[9]),
            "events": json.loads(row[10]),
            "status": json.loads(row[11]),
            "resource": json.loads(row[12]),
        }
    )


def span_values(
    rec: dict[str, Any], attempt_seq: int, sequence_id: int, attributes_json: str | None = None
) -> tuple[Any, ...]:
    """Row for S_INSERT_COLS from a span record (see lifecycle.span_record)."""
    attributes = attributes_json if attributes_json is not None else dumps(rec["attributes"])
    return (
        rec["rollout_id"], rec["attempt_id"], attempt_seq, sequence_id, rec["name"], rec["trace_id"],
        rec["span_id"], rec["parent_id"], rec["start_time"], rec["end_time"], attributes,
        dumps(rec["events"]), dumps(rec["status"]), dumps(rec["resource"]),
    )  # fmt: skip


def resources_from_row(row: Sequence[Any]) -> Resources:
    return Resources.model_validate(
        {
            "resources_id": row[0],
            "version": row[1],
            "created_at": row[2],
            "llms": json.loads(row[3]),
            "prompts": json.loads(row[4]),
            "metadata": json.loads(row[5]),
            "candidate": bool(row[6]),
        }
    )


def worker_from_row(row: Sequence[Any]) -> Worker:
    return Worker(
        worker_id=row[0],
        status=WorkerStatus(row[1]),
        last_heartbeat=row[2],
        current_rollout_id=row[3],
        current_attempt_id=row[4],
        metadata=json.loads(row[5]),
    )
