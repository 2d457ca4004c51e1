"""The PostgreSQL store's production records: sessions, feedback, canaries (learning from use).

A mixin of `PostgresStore` on its pool (`connections`); the rules come from `production_rules`,
shared with the other backends. Replicas race safely: a session is inserted ON CONFLICT DO
NOTHING, a retried feedback post finds the first by its client id, one canary is active at a time
(a unique partial index), and a decision locks the canary row, so two deciders decide once.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

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
from agentkiln.store.base import InvalidTransitionError, NotFoundError
from agentkiln.store.postgres import queries as q
from agentkiln.store.postgres.connections import Conn
from agentkiln.store.postgres.rows import (
    A_INSERT,
    R_INSERT,
    RES_SELECT,
    attempt_values,
    resources_from_row,
    rollout_values,
)

_SESSION_INSERT = R_INSERT + " ON CONFLICT (rollout_id) DO NOTHING RETURNING rollout_id"
_CALL_SQL = (
    f"SELECT {production_rules.CALL_COLS} FROM llm_calls WHERE call_id = %(c)s "
    "AND (%(r)s::text IS NULL OR rollout_id = %(r)s) ORDER BY choice_index, id LIMIT 1"
)
_SESSION_VERSION_SQL = (
    "SELECT attributes->>'kiln.model.version' FROM spans WHERE rollout_id = %s AND name = 'kiln.llm.call' "
    "ORDER BY attempt_seq DESC, sequence_id DESC LIMIT 1"
)
_SPAN_SQL = (
    "SELECT attempt_id, attributes::text FROM spans WHERE rollout_id = %s AND span_id = %s ORDER BY attempt_seq LIMIT 1"
)
# A purge holds the rollout row lock (FOR UPDATE): feedback on a rollout being purged waits, then finds it gone.
_KEEP_ROLLOUT = "SELECT 1 FROM rollouts WHERE rollout_id = %s FOR KEY SHARE"
_FEEDBACK_BY_CLIENT = "SELECT data::text FROM feedback WHERE client_id = %s"
_FEEDBACK_INSERT = (
    "INSERT INTO feedback (feedback_id, client_id, rollout_id, response_id, created_at, data) "
    "VALUES (%s, %s, %s, %s, %s, %s::json) ON CONFLICT (client_id) DO NOTHING RETURNING feedback_id"
)
# Last activity of a production rollout: its creation, an attempt's heartbeat (every span batch is
# one), or the latest span time its producer gave (GREATEST skips NULLs).
_IDLE_SQL = (
    "SELECT r.rollout_id FROM rollouts r WHERE r.mode = 'production' AND GREATEST(r.created_at, "
    "(SELECT max(a.last_heartbeat) FROM attempts a WHERE a.rollout_id = r.rollout_id), "
    "(SELECT max(GREATEST(s.start_time, s.end_time)) FROM spans s WHERE s.rollout_id = r.rollout_id)) < %s"
)
_PURGE = [f"DELETE FROM {table} WHERE rollout_id = ANY(%s)"
          for table in ("spans", "llm_calls", "feedback", "attempts", "rollouts")]  # fmt: skip
_CANARY_SELECT = "SELECT data::text FROM canaries"
_CANARY_INSERT = (
    "INSERT INTO canaries (canary_id, status, data) VALUES (%s, %s, %s::json) "
    "ON CONFLICT (status) WHERE status = 'active' DO NOTHING RETURNING canary_id"
)


async def _fetch(conn: Conn, query: str, args: Any = ()) -> Any:
    return await (await conn.execute(query, args)).fetchone()


def _canary(row: Any) -> Canary | None:
    return Canary.model_validate_json(row[0]) if row is not None else None


async def _resources(conn: Conn, resources_id: str) -> Resources | None:
    row = await _fetch(conn, f"SELECT {RES_SELECT} FROM resources WHERE resources_id = %s", (resources_id,))
    return resources_from_row(row) if row is not None else None


async def _session(conn: Conn, rollout_id: str) -> AttemptedRollout | None:
    try:
        rollout = await q.get_rollout(conn, rollout_id)
    except NotFoundError:
        return None
    latest = await q.latest_attempt(conn, rollout)
    return AttemptedRollout(rollout=rollout, attempt=latest) if latest is not None else None


async def _resolve(conn: Conn, feedback: FeedbackIn) -> production_rules.Target:
    if feedback.response_id is not None:
        row = await _fetch(conn, _CALL_SQL, {"c": feedback.response_id, "r": feedback.rollout_id})
        return production_rules.target_of_call(feedback, production_rules.CallEntry(*row) if row else None)
    if feedback.session_id is not None:
        rollout: Rollout | None
        try:
            rollout = await q.get_rollout(conn, production_rules.session_of(feedback) or "")
        except NotFoundError:
            rollout = None
        version = None
        if rollout is not None:
            row = await _fetch(conn, _SESSION_VERSION_SQL, (rollout.rollout_id,))
            version = row[0] if row is not None else None
        return production_rules.target_of_session(feedback, rollout, version)
    row = await _fetch(conn, _SPAN_SQL, (feedback.rollout_id, feedback.span_id))
    if row is None:
        return production_rules.target_of_span(feedback, None, None)
    return production_rules.target_of_span(feedback, row[0], json.loads(row[1]))


class PostgresProduction:
    """Sessions, feedback and canaries in the database (see base.Store for the contract)."""

    _write: Callable[[Callable[[Conn, list[str]], Awaitable[Any]]], Awaitable[Any]]
    _read: Callable[..., Awaitable[Any]]

    # ------------------------------------------------------------------ sessions

    async def open_session(self, session_id: str, *, metadata: dict[str, Any] | None = None) -> AttemptedRollout:
        """A read finds a known session without a write; concurrent first calls insert one (ON CONFLICT)."""
        rollout, attempt = production_rules.new_session(session_id, metadata, wall_now())
        known = await self._read(lambda conn: _session(conn, rollout.rollout_id), snapshot=True)
        if known is not None:
            return known

        async def op(conn: Conn, finished: list[str]) -> AttemptedRollout:
            if await _fetch(conn, _SESSION_INSERT, rollout_values(rollout)) is not None:
                await conn.execute(A_INSERT, attempt_values(attempt))
            stored = await _session(conn, rollout.rollout_id)  # the winner's, committed before our insert gave way
            assert stored is not None, "a session rollout without its attempt"
            return stored

        return await self._write(op)

    # ------------------------------------------------------------------ feedback

    async def add_feedback(self, feedback: FeedbackIn) -> Feedback:
        async def first_stored(conn: Conn) -> Feedback | None:
            row = await _fetch(conn, _FEEDBACK_BY_CLIENT, (feedback.client_id,))
            return Feedback.model_validate_json(row[0]) if row is not None else None

        async def op(conn: Conn, finished: list[str]) -> Feedback:
            if feedback.client_id is not None and (earlier := await first_stored(conn)) is not None:
                return earlier
            target = await _resolve(conn, feedback)
            if await _fetch(conn, _KEEP_ROLLOUT, (target.rollout_id,)) is None:
                raise NotFoundError(f"rollout {target.rollout_id} was purged")
            stored = production_rules.new_feedback(feedback, target, wall_now())
            row = await _fetch(
                conn,
                _FEEDBACK_INSERT,
                (stored.feedback_id, stored.client_id, stored.rollout_id, stored.response_id, stored.created_at,
                 stored.model_dump_json()),
            )  # fmt: skip
            if row is None:  # another replica stored this client id meanwhile: its record is the answer
                earlier = await first_stored(conn)
                assert earlier is not None
                return earlier
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
            "data::text", rollout_id=rid, response_id=response_id, since=since, mark="%s"
        )

        async def op(conn: Conn) -> list[Feedback]:
            cur = await conn.execute(sql, (*args, limit, offset))
            return [Feedback.model_validate_json(row[0]) for row in await cur.fetchall()]

        return await self._read(op)

    async def purge_production(self, before: float) -> int:
        """Idle rollouts are found, locked (as every writer of a rollout does), checked again, then deleted."""

        async def op(conn: Conn, finished: list[str]) -> int:
            cur = await conn.execute(_IDLE_SQL, (before,))
            found = [row[0] for row in await cur.fetchall()]
            if not found:
                return 0
            locked = await q.lock_rollouts(conn, found)
            cur = await conn.execute(_IDLE_SQL + " AND r.rollout_id = ANY(%s)", (before, list(locked)))
            ids = [row[0] for row in await cur.fetchall()]  # a span that arrived meanwhile keeps its session
            if ids:
                for stmt in _PURGE:
                    await conn.execute(stmt, (ids,))
            return len(ids)

        return await self._write(op)

    # ------------------------------------------------------------------ canaries

    async def start_canary(self, canary: CanaryIn) -> Canary:
        async def op(conn: Conn, finished: list[str]) -> Canary:
            baseline_id = canary.baseline_resources_id
            made = production_rules.new_canary(
                canary,
                active=_canary(await _fetch(conn, f"{_CANARY_SELECT} WHERE status = 'active'")),
                candidate=await _resources(conn, canary.candidate_resources_id),
                baseline=await _resources(conn, baseline_id)
                if baseline_id is not None
                else await q.latest_deployed(conn),
                now=wall_now(),
            )
            if await _fetch(conn, _CANARY_INSERT, (made.canary_id, made.status.value, made.model_dump_json())) is None:
                raise InvalidTransitionError("another canary was started meanwhile: promote or roll it back first")
            return made

        return await self._write(op)

    async def get_canary(self, canary_id: str) -> Canary:
        async def op(conn: Conn) -> Canary:
            found = _canary(await _fetch(conn, f"{_CANARY_SELECT} WHERE canary_id = %s", (canary_id,)))
            if found is None:
                raise NotFoundError(f"canary {canary_id} not found")
            return found

        return await self._read(op)

    async def get_active_canary(self) -> Canary | None:
        async def op(conn: Conn) -> Canary | None:
            return _canary(await _fetch(conn, f"{_CANARY_SELECT} WHERE status = 'active'"))

        return await self._read(op)

    async def query_canaries(self, *, limit: int = 100, offset: int = 0) -> list[Canary]:
        lifecycle.check_page(limit, offset)

        async def op(conn: Conn) -> list[Canary]:
            cur = await conn.execute(f"{_CANARY_SELECT} ORDER BY seq DESC LIMIT %s OFFSET %s", (limit, offset))
            return [Canary.model_validate_json(row[0]) for row in await cur.fetchall()]

        return await self._read(op)

    async def decide_canary(
        self, canary_id: str, decision: CanaryDecision, *, promoted_resources_id: str | None = None
    ) -> Canary:
        async def op(conn: Conn, finished: list[str]) -> Canary:
            row = await _fetch(conn, f"{_CANARY_SELECT} WHERE canary_id = %s FOR UPDATE", (canary_id,))
            current = _canary(row)
            if current is None:
                raise NotFoundError(f"canary {canary_id} not found")
            decided = production_rules.decide_canary(current, decision, promoted_resources_id, wall_now())
            await conn.execute(
                "UPDATE canaries SET status = %s, data = %s::json WHERE canary_id = %s",
                (decided.status.value, decided.model_dump_json(), canary_id),
            )
            return decided

        return await self._write(op)
