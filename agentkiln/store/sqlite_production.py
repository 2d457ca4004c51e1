"""The SQLite store's production records: sessions, feedback, canaries (learning from use).

A mixin of `SqliteStore` on its connections (`sqlite_connections`); the rules come from
`production_rules`, shared with the other backends. Writes commit before they return, like every
SqliteStore write: an acknowledged feedback post survives a killed server.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from agentkiln.models import (
    AttemptedRollout,
    Canary,
    CanaryDecision,
    CanaryIn,
    Feedback,
    FeedbackIn,
    Resources,
    Rollout,
)
from agentkiln.models import now as wall_now
from agentkiln.store import lifecycle, production_rules
from agentkiln.store import sqlite_queries as q
from agentkiln.store.base import InvalidTransitionError, NotFoundError
from agentkiln.store.sqlite_rows import R_COLS, RES_COLS, dumps, resources_from_row, rollout_values

T = TypeVar("T")

_CALL_SQL = (
    f"SELECT {production_rules.CALL_COLS} FROM llm_calls WHERE call_id = ?1 AND (?2 IS NULL OR rollout_id = ?2) "
    "ORDER BY choice_index, id LIMIT 1"
)
_SESSION_VERSION_SQL = (
    "SELECT json_extract(attributes, '$.\"kiln.model.version\"') FROM spans WHERE rollout_id = ? "
    "AND name = 'kiln.llm.call' ORDER BY attempt_seq DESC, sequence_id DESC LIMIT 1"
)
_SPAN_SQL = "SELECT attempt_id, attributes FROM spans WHERE rollout_id = ? AND span_id = ? ORDER BY attempt_seq LIMIT 1"
_FEEDBACK_INSERT = (
    "INSERT INTO feedback (feedback_id, client_id, rollout_id, response_id, created_at, data) VALUES (?,?,?,?,?,?)"
)
# Last activity of a production rollout: its creation, an attempt's heartbeat (every span batch is
# one), or the latest span time its producer gave.
_IDLE_SQL = (
    "SELECT r.rollout_id FROM rollouts r WHERE r.mode = 'production' AND max(r.created_at, "
    "COALESCE((SELECT max(a.last_heartbeat) FROM attempts a WHERE a.rollout_id = r.rollout_id), 0), "
    "COALESCE((SELECT max(max(s.start_time, COALESCE(s.end_time, s.start_time))) FROM spans s "
    "WHERE s.rollout_id = r.rollout_id), 0)) < ?"
)
_PURGE = [f"DELETE FROM {table} WHERE rollout_id IN (SELECT value FROM json_each(?))"
          for table in ("spans", "llm_calls", "feedback", "attempts", "rollouts")]  # fmt: skip
_CANARY_SELECT = "SELECT data FROM canaries"


def _canary(row: Any) -> Canary | None:
    return Canary.model_validate_json(row[0]) if row is not None else None


def _resources(conn: sqlite3.Connection, resources_id: str) -> Resources | None:
    row = conn.execute(f"SELECT {RES_COLS} FROM resources WHERE resources_id = ?", (resources_id,)).fetchone()
    return resources_from_row(row) if row is not None else None


def _resolve(conn: sqlite3.Connection, feedback: FeedbackIn) -> production_rules.Target:
    if feedback.response_id is not None:
        row = conn.execute(_CALL_SQL, (feedback.response_id, feedback.rollout_id)).fetchone()
        return production_rules.target_of_call(feedback, production_rules.CallEntry(*row) if row else None)
    if feedback.session_id is not None:
        rollout_id = production_rules.session_of(feedback)
        try:
            rollout: Rollout | None = q.get_rollout(conn, rollout_id or "")
        except NotFoundError:
            rollout = None
        version = None
        if rollout is not None:
            row = conn.execute(_SESSION_VERSION_SQL, (rollout.rollout_id,)).fetchone()
            version = None if row is None or row[0] is None else str(row[0])
        return production_rules.target_of_session(feedback, rollout, version)
    row = conn.execute(_SPAN_SQL, (feedback.rollout_id, feedback.span_id)).fetchone()
    if row is None:
        return production_rules.target_of_span(feedback, None, None)
    return production_rules.target_of_span(feedback, row[0], json.loads(row[1]))


class SqliteProduction:
    """Sessions, feedback and canaries in the SQLite file (see base.Store for the contract)."""

    _write: Callable[..., Any]
    _read: Callable[..., Any]
    _call: Callable[..., Any]

    # ------------------------------------------------------------------ sessions

    async def open_session(self, session_id: str, *, metadata: dict[str, Any] | None = None) -> AttemptedRollout:
        """A read finds a known session without the write lock; a first call inserts unless another won."""
        rollout, attempt = production_rules.new_session(session_id, metadata, wall_now())

        def found(conn: sqlite3.Connection) -> AttemptedRollout | None:
            try:
                stored = q.get_rollout(conn, rollout.rollout_id)
            except NotFoundError:
                return None
            latest = q.latest_attempt(conn, stored)
            return AttemptedRollout(rollout=stored, attempt=latest) if latest is not None else None

        known = await self._read(found)
        if known is not None:
            return known

        def op(conn: sqlite3.Connection) -> AttemptedRollout:
            values = rollout_values(rollout)
            inserted = conn.execute(f"INSERT OR IGNORE INTO rollouts ({R_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", values)
            if inserted.rowcount:
                q.insert_attempt(conn, attempt)
            stored = found(conn)
            assert stored is not None, "a session rollout without its attempt"
            return stored

        return await self._write(op)

    # ------------------------------------------------------------------ feedback

    async def add_feedback(self, feedback: FeedbackIn) -> Feedback:
        def op(conn: sqlite3.Connection) -> Feedback:
            if feedback.client_id is not None:
                row = conn.execute("SELECT data FROM feedback WHERE client_id = ?", (feedback.client_id,)).fetchone()
                if row is not None:
                    return Feedback.model_validate_json(row[0])
            stored = production_rules.new_feedback(feedback, _resolve(conn, feedback), wall_now())
            conn.execute(
                _FEEDBACK_INSERT,
                (stored.feedback_id, stored.client_id, stored.rollout_id, stored.response_id, stored.created_at,
                 stored.model_dump_json()),
            )  # fmt: skip
            return stored

        return await self._write(op)

    async def query_feedback(
        self,
        *,
        session_id: str | None = None,
        rollout_id: str | None = None,
        response_id: str | None = None,
        since: float | None = None,
        limit: int = 1_000,
        offset: int = 0,
    ) -> list[Feedback]:
        lifecycle.check_page(limit, offset)
        rid, possible = production_rules.feedback_filter(session_id=session_id, rollout_id=rollout_id)
        if not possible:
            return []
        sql, args = production_rules.feedback_query_sql(
            "data", rollout_id=rid, response_id=response_id, since=since, mark="?"
        )

        def op(conn: sqlite3.Connection) -> list[Feedback]:
            return [Feedback.model_validate_json(row[0]) for row in conn.execute(sql, (*args, limit, offset))]

        return await self._call(op, write=False)

    async def purge_production(self, before: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            ids = [row[0] for row in conn.execute(_IDLE_SQL, (before,))]
            if ids:
                for stmt in _PURGE:
                    conn.execute(stmt, (dumps(ids),))
            return len(ids)

        return await self._call(op)

    # ------------------------------------------------------------------ canaries

    async def start_canary(self, canary: CanaryIn) -> Canary:
        def op(conn: sqlite3.Connection) -> Canary:
            active = _canary(conn.execute(f"{_CANARY_SELECT} WHERE status = 'active'").fetchone())
            baseline_id = canary.baseline_resources_id
            made = production_rules.new_canary(
                canary,
                active=active,
                candidate=_resources(conn, canary.candidate_resources_id),
                baseline=_resources(conn, baseline_id) if baseline_id is not None else q.latest_deployed(conn),
                now=wall_now(),
            )
            conn.execute(
                "INSERT INTO canaries (canary_id, status, data) VALUES (?, ?, ?)",
                (made.canary_id, made.status.value, made.model_dump_json()),
            )
            return made

        return await self._call(op)

    async def get_canary(self, canary_id: str) -> Canary:
        def op(conn: sqlite3.Connection) -> Canary:
            found = _canary(conn.execute(f"{_CANARY_SELECT} WHERE canary_id = ?", (canary_id,)).fetchone())
            if found is None:
                raise NotFoundError(f"canary {canary_id} not found")
            return found

        return await self._read(op)

    async def get_active_canary(self) -> Canary | None:
        return await self._read(lambda conn: _canary(conn.execute(f"{_CANARY_SELECT} WHERE status = 'active'").fetchone()))

    async def query_canaries(self, *, limit: int = 100, offset: int = 0) -> list[Canary]:
        lifecycle.check_page(limit, offset)

        def op(conn: sqlite3.Connection) -> list[Canary]:
            rows = conn.execute(f"{_CANARY_SELECT} ORDER BY seq DESC LIMIT ? OFFSET ?", (limit, offset))
            return [Canary.model_validate_json(row[0]) for row in rows]

        return await self._call(op, write=False)

    async def decide_canary(
        self, canary_id: str, decision: CanaryDecision, *, promoted_resources_id: str | None = None
    ) -> Canary:
        def op(conn: sqlite3.Connection) -> Canary:
            current = _canary(conn.execute(f"{_CANARY_SELECT} WHERE canary_id = ?", (canary_id,)).fetchone())
            if current is None:
                raise NotFoundError(f"canary {canary_id} not found")
            decided = production_rules.decide_canary(current, decision, promoted_resources_id, wall_now())
            updated = conn.execute(
                "UPDATE canaries SET status = ?, data = ? WHERE canary_id = ? AND status = 'active'",
                (decided.status.value, decided.model_dump_json(), canary_id),
            )
            if not updated.rowcount:  # the write lock makes this unreachable; the WHERE keeps it true anyway
                raise InvalidTransitionError(f"canary {canary_id} was decided meanwhile")
            return decided

        return await self._call(op)
