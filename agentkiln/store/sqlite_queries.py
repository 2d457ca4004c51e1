"""Statements the SQLite store's operations share; each runs on the DB thread inside the caller's transaction."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from typing import Any

from agentkiln.models import Attempt, AttemptedRollout, AttemptStatus, Resources, Rollout, Span
from agentkiln.models import now as wall_now
from agentkiln.store import lifecycle, production_rules
from agentkiln.store.base import NotFoundError
from agentkiln.store.sqlite_rows import (
    A_COLS,
    R_COLS,
    RES_COLS,
    S_COLS,
    S_INSERT_COLS,
    attempt_from_row,
    attempt_values,
    dumps,
    resources_from_row,
    rollout_from_row,
    rollout_values,
    span_from_row,
    span_values,
)

log = logging.getLogger(__name__)

WAITING = "status IN ('queuing', 'requeuing')"
# INDEXED BY: without statistics the planner prefers rollouts_status plus a sort of every waiting row.
DEQUEUE_SQL = f"SELECT {R_COLS} FROM rollouts INDEXED BY rollouts_waiting WHERE {WAITING} ORDER BY seq LIMIT 1"
# An owner attempt, its last span sequence number, and whether span ?3 is stored already (NULL: none is).
_OWNER_SQL = (
    f"SELECT {A_COLS}, (SELECT COALESCE(MAX(sequence_id), 0) FROM spans WHERE rollout_id = ?1 AND attempt_id = ?2), "
    "EXISTS (SELECT 1 FROM spans WHERE rollout_id = ?1 AND attempt_id = ?2 AND span_id = ?3) "
    "FROM attempts WHERE attempt_id = ?2 AND rollout_id = ?1"
)
_STORED_SPANS_SQL = (
    f"SELECT {S_COLS} FROM spans WHERE rollout_id = ? AND attempt_id = ? "
    "AND span_id IN (SELECT value FROM json_each(?))"
)
_STORED_SPAN_SQL = f"SELECT {S_COLS} FROM spans WHERE rollout_id = ? AND attempt_id = ? AND span_id = ?"


_CALL_INSERT_SQL = f"INSERT OR IGNORE INTO llm_calls ({production_rules.CALL_COLS}) VALUES (?,?,?,?,?,?)"
_LATEST_DEPLOYED_SQL = f"SELECT {RES_COLS} FROM resources WHERE candidate = 0 ORDER BY version DESC LIMIT 1"


def latest_deployed(conn: sqlite3.Connection) -> Resources | None:
    """The latest resources that are not a candidate (what get_latest_resources answers)."""
    row = conn.execute(_LATEST_DEPLOYED_SQL).fetchone()
    return resources_from_row(row) if row is not None else None


def get_rollout(conn: sqlite3.Connection, rollout_id: str) -> Rollout:
    row = conn.execute(f"SELECT {R_COLS} FROM rollouts WHERE rollout_id = ?", (rollout_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"rollout {rollout_id} not found")
    return rollout_from_row(row)


def get_attempt(conn: sqlite3.Connection, rollout_id: str, attempt_id: str) -> Attempt:
    row = conn.execute(
        f"SELECT {A_COLS} FROM attempts WHERE attempt_id = ? AND rollout_id = ?", (attempt_id, rollout_id)
    ).fetchone()
    if row is None:
        raise NotFoundError(f"attempt {attempt_id} of rollout {rollout_id} not found")
    return attempt_from_row(row)


def latest_attempt(conn: sqlite3.Connection, rollout: Rollout) -> Attempt | None:
    row = conn.execute(
        f"SELECT {A_COLS} FROM attempts WHERE rollout_id = ? AND sequence_id = ?",
        (rollout.rollout_id, rollout.num_attempts),
    ).fetchone()
    return attempt_from_row(row) if row is not None else None


def insert_rollouts(conn: sqlite3.Connection, rollouts: Sequence[Rollout]) -> None:
    conn.executemany(
        f"INSERT INTO rollouts ({R_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", [rollout_values(r) for r in rollouts]
    )


def save_rollout(conn: sqlite3.Connection, r: Rollout) -> None:
    v = rollout_values(r)
    conn.execute(
        "UPDATE rollouts SET status=?, mode=?, resources_id=?, config=?, metadata=?, start_time=?, end_time=?, "
        "num_attempts=? WHERE rollout_id=?",
        (v[1], v[2], v[4], v[5], v[6], v[8], v[9], v[10], v[0]),
    )


def insert_attempt(conn: sqlite3.Connection, a: Attempt) -> None:
    conn.execute(f"INSERT INTO attempts ({A_COLS}) VALUES (?,?,?,?,?,?,?,?,?)", attempt_values(a))


def save_attempt(conn: sqlite3.Connection, a: Attempt) -> None:
    v = attempt_values(a)
    conn.execute(
        "UPDATE attempts SET worker_id=?, status=?, end_time=?, last_heartbeat=?, error=? "
        "WHERE rollout_id=? AND attempt_id=?",
        (v[3], v[4], v[6], v[7], v[8], v[1], v[0]),
    )


def apply(conn: sqlite3.Connection, change: lifecycle.Change) -> bool:
    """Persist a lifecycle change; True if it finished a rollout (waiters must look)."""
    if change.attempt is not None:
        save_attempt(conn, change.attempt)
    if change.rollout is not None:
        save_rollout(conn, change.rollout)
        return change.rollout.status.finished
    return False


def start(conn: sqlite3.Connection, rollout: Rollout, worker_id: str | None) -> AttemptedRollout:
    change = lifecycle.start_attempt(rollout, worker_id, wall_now())
    assert change.rollout is not None and change.attempt is not None
    insert_attempt(conn, change.attempt)
    save_rollout(conn, change.rollout)
    return AttemptedRollout(rollout=change.rollout, attempt=change.attempt)


def fetch_rollouts(conn: sqlite3.Connection, rollout_ids: Sequence[str]) -> dict[str, Rollout]:
    rows = conn.execute(
        f"SELECT {R_COLS} FROM rollouts WHERE rollout_id IN (SELECT value FROM json_each(?))",
        (dumps(list(rollout_ids)),),
    ).fetchall()
    return {row[0]: rollout_from_row(row) for row in rows}


def stored_spans(
    conn: sqlite3.Connection, rollout_id: str, attempt_id: str, span_ids: Sequence[str]
) -> dict[str, Span]:
    """Spans of one attempt already stored under these span ids, by span id (the first stored if repeated).

    No ORDER BY: it could tempt the planner off the span key index onto a scan of the attempt.
    """
    if len(span_ids) == 1:  # the gateway's lone span: a plain key lookup, no JSON list to build and scan
        rows = conn.execute(_STORED_SPAN_SQL, (rollout_id, attempt_id, span_ids[0])).fetchall()
    else:
        rows = conn.execute(_STORED_SPANS_SQL, (rollout_id, attempt_id, dumps(list(span_ids)))).fetchall()
    found: dict[str, Span] = {}
    for row in rows:  # repeats exist only in files from before the span key index
        span = span_from_row(row)
        if span.span_id not in found or span.sequence_id < found[span.span_id].sequence_id:
            found[span.span_id] = span
    return found


def _owner(
    conn: sqlite3.Connection, rollout_id: str, attempt_id: str, span_id: str | None
) -> tuple[Attempt, int, bool]:
    """The attempt, its last span sequence number and whether `span_id` is stored: one statement, not three.

    This runs once per recorded LLM call (the gateway writes lone spans).
    """
    row = conn.execute(_OWNER_SQL, (rollout_id, attempt_id, span_id)).fetchone()
    if row is None:
        raise NotFoundError(f"attempt {attempt_id} of rollout {rollout_id} not found")
    return attempt_from_row(row), row[-2], bool(row[-1])


def insert_spans(conn: sqlite3.Connection, records: list[dict[str, Any]], attributes_json: list[str]) -> list[Span]:
    """Store a validated batch of span records in one transaction; spans already stored come back as stored.

    Every owner attempt is checked before anything is written, sequence numbers continue each
    attempt's, and each attempt's activity (heartbeat, revival) is recorded once.
    """
    owners: dict[tuple[str, str], tuple[Rollout | None, Attempt, int]] = {}
    wanted: dict[tuple[str, str], list[str]] = {}
    lone = records[0]["span_id"] if len(records) == 1 else None  # its re-sent check rides on the owner query
    maybe_stored = lone is None
    for rec in records:  # validate the whole batch before storing any of it
        key = (rec["rollout_id"], rec["attempt_id"])
        if key not in owners:
            attempt, last, stored = _owner(conn, *key, lone)  # it exists only if its rollout does
            maybe_stored = maybe_stored or stored
            # The rollout matters only to revive an unresponsive attempt (see record_activity).
            rollout = get_rollout(conn, key[0]) if attempt.status == AttemptStatus.unresponsive else None
            owners[key] = (rollout, attempt, last)
        wanted.setdefault(key, []).append(rec["span_id"])
    known = {
        (*key, span_id): span
        for key, span_ids in (wanted.items() if maybe_stored else ())
        for span_id, span in stored_spans(conn, *key, span_ids).items()
    }
    out, fresh = lifecycle.place_spans(records, known, owners)
    rows = [span_values(rec, attempt_seq, seq, attributes_json[i]) for i, rec, attempt_seq, seq in fresh]
    conn.executemany(f"INSERT INTO spans ({S_INSERT_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    calls = production_rules.call_entries(rec for _, rec, _, _ in fresh)
    if calls:  # the response-id index (feedback targets), in the spans' transaction
        conn.executemany(_CALL_INSERT_SQL, [c.values() for c in calls])
    now = wall_now()
    for rollout, attempt, _ in owners.values():
        is_latest = rollout is not None and attempt.sequence_id == rollout.num_attempts
        apply(conn, lifecycle.record_activity(rollout, attempt, is_latest, now))
    return out
