"""Statements the PostgreSQL store's operations share; each runs inside the caller's transaction.

Concurrency: every write that touches a rollout or its attempts and spans first locks the
rollout row (`FOR UPDATE`, several in rollout_id order), so writers of one rollout take turns
whichever replica they run on, and lock waits can never form a cycle. Dequeue skips locked rows
instead (`FOR UPDATE SKIP LOCKED`): concurrent dequeuers each take a different waiting rollout.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from agentkiln.models import Attempt, AttemptedRollout, Resources, Rollout, Span
from agentkiln.models import now as wall_now
from agentkiln.store import lifecycle, production_rules
from agentkiln.store.base import NotFoundError
from agentkiln.store.postgres.connections import Conn
from agentkiln.store.postgres.rows import (
    A_INSERT,
    A_SELECT,
    A_SELECT_A,
    R_INSERT,
    R_SELECT,
    R_SELECT_R,
    RES_SELECT,
    S_INSERT,
    S_SELECT,
    attempt_from_row,
    attempt_values,
    resources_from_row,
    rollout_from_row,
    rollout_values,
    span_from_row,
    span_values,
)
from agentkiln.store.postgres.schema import LOCK_SWEEP

log = logging.getLogger(__name__)

DEQUEUE_SQL = (
    f"SELECT {R_SELECT} FROM rollouts WHERE status IN ('queuing', 'requeuing') "
    "ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED"
)
_OWNER_SQL = (
    f"SELECT {A_SELECT}, (SELECT COALESCE(MAX(sequence_id), 0) FROM spans "
    "WHERE rollout_id = %(r)s AND attempt_id = %(a)s) FROM attempts WHERE attempt_id = %(a)s AND rollout_id = %(r)s"
)
_LOCK_SQL = f"SELECT {R_SELECT} FROM rollouts WHERE rollout_id = ANY(%s) ORDER BY rollout_id FOR UPDATE"
_STORED_SPANS_SQL = f"SELECT {S_SELECT} FROM spans WHERE rollout_id = %s AND attempt_id = %s AND span_id = ANY(%s)"
_CALL_INSERT_SQL = (
    f"INSERT INTO llm_calls ({production_rules.CALL_COLS}) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
)
_LATEST_DEPLOYED_SQL = f"SELECT {RES_SELECT} FROM resources WHERE NOT candidate ORDER BY version DESC LIMIT 1"


async def latest_deployed(conn: Conn) -> Resources | None:
    """The latest resources that are not a candidate (what get_latest_resources answers)."""
    row = await _one(conn, _LATEST_DEPLOYED_SQL, ())
    return resources_from_row(row) if row is not None else None


async def _one(conn: Conn, query: str, args: Sequence[Any] | dict[str, Any]) -> Any:
    return await (await conn.execute(query, args)).fetchone()


async def get_rollout(conn: Conn, rollout_id: str, *, lock: bool = False) -> Rollout:
    row = await _one(
        conn, f"SELECT {R_SELECT} FROM rollouts WHERE rollout_id = %s" + (" FOR UPDATE" if lock else ""), (rollout_id,)
    )
    if row is None:
        raise NotFoundError(f"rollout {rollout_id} not found")
    return rollout_from_row(row)


async def lock_rollouts(conn: Conn, rollout_ids: Sequence[str]) -> dict[str, Rollout]:
    """Lock these rollouts in id order (the order every writer uses) and return those that exist."""
    cur = await conn.execute(_LOCK_SQL, (sorted(set(rollout_ids)),))
    return {row[0]: rollout_from_row(row) for row in await cur.fetchall()}


async def get_attempt(conn: Conn, rollout_id: str, attempt_id: str) -> Attempt:
    row = await _one(
        conn, f"SELECT {A_SELECT} FROM attempts WHERE attempt_id = %s AND rollout_id = %s", (attempt_id, rollout_id)
    )
    if row is None:
        raise NotFoundError(f"attempt {attempt_id} of rollout {rollout_id} not found")
    return attempt_from_row(row)


async def latest_attempt(conn: Conn, rollout: Rollout) -> Attempt | None:
    row = await _one(
        conn,
        f"SELECT {A_SELECT} FROM attempts WHERE rollout_id = %s AND sequence_id = %s",
        (rollout.rollout_id, rollout.num_attempts),
    )
    return attempt_from_row(row) if row is not None else None


async def insert_rollouts(conn: Conn, rollouts: Sequence[Rollout]) -> None:
    """In list order, so the identity column (FIFO order) follows the batch."""
    async with conn.cursor() as cur:
        await cur.executemany(R_INSERT, [rollout_values(r) for r in rollouts])


async def save_rollout(conn: Conn, r: Rollout) -> None:
    v = rollout_values(r)
    await conn.execute(
        "UPDATE rollouts SET status=%s, mode=%s, resources_id=%s, config=%s::jsonb, metadata=%s::json, "
        "start_time=%s, end_time=%s, num_attempts=%s WHERE rollout_id=%s",
        (v[1], v[2], v[4], v[5], v[6], v[8], v[9], v[10], v[0]),
    )


async def save_attempt(conn: Conn, a: Attempt) -> None:
    v = attempt_values(a)
    await conn.execute(
        "UPDATE attempts SET worker_id=%s, status=%s, end_time=%s, last_heartbeat=%s, error=%s::jsonb "
        "WHERE rollout_id=%s AND attempt_id=%s",
        (v[3], v[4], v[6], v[7], v[8], v[1], v[0]),
    )


async def apply(conn: Conn, change: lifecycle.Change, finished: list[str]) -> bool:
    """Persist a lifecycle change; a rollout it finishes goes on `finished` (its waiters are notified)."""
    if change.attempt is not None:
        await save_attempt(conn, change.attempt)
    if change.rollout is not None:
        await save_rollout(conn, change.rollout)
        if change.rollout.status.finished:
            finished.append(change.rollout.rollout_id)
            return True
    return False


async def start(conn: Conn, rollout: Rollout, worker_id: str | None) -> AttemptedRollout:
    change = lifecycle.start_attempt(rollout, worker_id, wall_now())
    assert change.rollout is not None and change.attempt is not None
    await conn.execute(A_INSERT, attempt_values(change.attempt))
    await save_rollout(conn, change.rollout)
    return AttemptedRollout(rollout=change.rollout, attempt=change.attempt)


async def fetch_rollouts(conn: Conn, rollout_ids: Sequence[str]) -> dict[str, Rollout]:
    cur = await conn.execute(f"SELECT {R_SELECT} FROM rollouts WHERE rollout_id = ANY(%s)", (list(rollout_ids),))
    return {row[0]: rollout_from_row(row) for row in await cur.fetchall()}


async def insert_spans(conn: Conn, records: list[dict[str, Any]], attributes_json: list[str]) -> list[Span]:
    """Store a validated batch of span records; spans already stored come back as stored (as SQLite's).

    Every owner attempt is checked before anything is written, sequence numbers continue each
    attempt's, and each attempt's activity (heartbeat, revival) is recorded once.
    """
    keys = list(dict.fromkeys((rec["rollout_id"], rec["attempt_id"]) for rec in records))
    wanted: dict[tuple[str, str], list[str]] = {}
    for rec in records:
        wanted.setdefault((rec["rollout_id"], rec["attempt_id"]), []).append(rec["span_id"])
    # All lookups are sent before any answer is read (one round trip in pipeline mode); the server
    # runs them in order, so the owners and stored spans are read under the rollout locks.
    locked = await conn.execute(_LOCK_SQL, (sorted({rid for rid, _ in keys}),))
    owner_rows = [await conn.execute(_OWNER_SQL, {"r": rid, "a": aid}) for rid, aid in keys]
    stored_rows = [await conn.execute(_STORED_SPANS_SQL, (*key, wanted[key])) for key in keys]
    rollouts = {row[0]: rollout_from_row(row) for row in await locked.fetchall()}
    owners: dict[tuple[str, str], tuple[Rollout | None, Attempt, int]] = {}
    for key, cur in zip(keys, owner_rows):
        row = await cur.fetchone()
        if row is None or key[0] not in rollouts:
            raise NotFoundError(f"attempt {key[1]} of rollout {key[0]} not found")
        owners[key] = (rollouts[key[0]], attempt_from_row(row), row[-1])
    known: dict[tuple[str, str, str], Span] = {}
    for key, cur in zip(keys, stored_rows):
        for span in map(span_from_row, await cur.fetchall()):
            known[(*key, span.span_id)] = span
    out, fresh = lifecycle.place_spans(records, known, owners)
    rows = [span_values(rec, attempt_seq, seq, attributes_json[i]) for i, rec, attempt_seq, seq in fresh]
    if rows:
        async with conn.cursor() as cur:
            await cur.executemany(S_INSERT, rows)
    calls = production_rules.call_entries(rec for _, rec, _, _ in fresh)
    if calls:  # the response-id index (feedback targets), in the spans' transaction
        async with conn.cursor() as cur:
            await cur.executemany(_CALL_INSERT_SQL, [c.values() for c in calls])
    now = wall_now()
    ignored: list[str] = []  # activity never finishes a rollout
    for rollout, attempt, _ in owners.values():
        is_latest = rollout is not None and attempt.sequence_id == rollout.num_attempts
        await apply(conn, lifecycle.record_activity(rollout, attempt, is_latest, now), ignored)
    return out


async def sweep(conn: Conn, at: float, finished: list[str]) -> list[Attempt]:
    """check_timeouts in the caller's transaction; one replica at a time sweeps a schema.

    The transaction-level advisory lock is released at commit; a sweep that finds it taken (another
    replica is sweeping) returns at once with nothing changed, so no attempt is judged twice.
    """
    lock = "SELECT pg_try_advisory_xact_lock(%s, hashtext(current_schema()))"
    if not (await _one(conn, lock, (LOCK_SWEEP,)))[0]:
        log.debug("another store is sweeping this schema; skipping")
        return []
    cur = await conn.execute(
        f"SELECT {A_SELECT_A}, {R_SELECT_R} FROM attempts a JOIN rollouts r ON r.rollout_id = a.rollout_id "
        "WHERE a.status = 'running'"
    )
    due = []  # found without row locks; checked again below under the rollouts' locks
    for row in await cur.fetchall():
        attempt, rollout = attempt_from_row(row[:9]), rollout_from_row(row[9:])
        if lifecycle.sweep_attempt(rollout, attempt, attempt.sequence_id == rollout.num_attempts, at):
            due.append(rollout.rollout_id)
    if not due:
        return []
    rollouts = await lock_rollouts(conn, due)
    cur = await conn.execute(
        f"SELECT {A_SELECT} FROM attempts WHERE rollout_id = ANY(%s) AND status = 'running' "
        "ORDER BY rollout_id, sequence_id",
        (list(rollouts),),
    )
    changed = []
    for row in await cur.fetchall():
        attempt = attempt_from_row(row)
        rollout = rollouts[attempt.rollout_id]
        change = lifecycle.sweep_attempt(rollout, attempt, attempt.sequence_id == rollout.num_attempts, at)
        if change is not None:
            await apply(conn, change, finished)
            rollouts[attempt.rollout_id] = change.rollout or rollout
            changed.append(change.attempt)
    return changed
