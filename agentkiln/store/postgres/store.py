"""PostgreSQL store: the SQLite store's semantics on a database that several `kiln serve` replicas share.

Lifecycle rules come from `lifecycle` (shared with every backend); this module holds the Store methods,
`queries` the statements they share, `connections` the pool and NOTIFY listener, `schema` the migrations.

Several replicas on one database: writers of one rollout take turns on its row lock, dequeues
skip each other's locked rows, finishes are announced with NOTIFY so every replica's waiters
wake, and the timeout sweep takes a transaction-level advisory lock (`pg_try_advisory_xact_lock`):
while one replica sweeps, the others' sweeps return at once with nothing changed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from agentkiln.models import (
    Attempt,
    AttemptedRollout,
    AttemptError,
    AttemptStatus,
    Resources,
    ResourcesIn,
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
from agentkiln.models import now as wall_now
from agentkiln.store import lifecycle
from agentkiln.store.base import NotFoundError, Store
from agentkiln.store.postgres import queries as q
from agentkiln.store.postgres.connections import Conn, PostgresConnections
from agentkiln.store.postgres.idempotency import PostgresIdempotency
from agentkiln.store.postgres.production import PostgresProduction
from agentkiln.store.postgres.responses import PostgresResponses
from agentkiln.store.postgres.rows import (
    A_SELECT,
    R_SELECT,
    RES_INSERT,
    RES_SELECT,
    S_SELECT,
    W_SELECT,
    W_UPSERT,
    attempt_from_row,
    dumps,
    resources_from_row,
    rollout_from_row,
    span_from_row,
    worker_from_row,
)
from agentkiln.store.postgres.schema import LOCK_RESOURCES

log = logging.getLogger(__name__)

FALLBACK_POLL_S = 2.0  # waiters re-read this often even without a notification
UNHEARD_POLL_S = 0.25  # ... and this often while the listener is not connected
LISTEN_START_S = 2.0  # a first wait gives the listener this long to connect


class PostgresStore(PostgresProduction, PostgresResponses, PostgresConnections, Store):
    """Store in a PostgreSQL database (URL `postgresql://user@host:port/db`, optional `?schema=name`)."""

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        pool_size: int = 10,
        sweep_interval_s: float | None = 1.0,
        poll_s: float = FALLBACK_POLL_S,
        open_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(url, schema=schema, pool_size=pool_size, open_timeout_s=open_timeout_s)
        self._sweep_interval_s = sweep_interval_s
        self._last_sweep = time.monotonic()
        self._poll_s = poll_s
        self._idempotency: PostgresIdempotency | None = None

    async def _maybe_sweep(self) -> None:
        if self._sweep_interval_s is not None and time.monotonic() - self._last_sweep >= self._sweep_interval_s:
            self._last_sweep = time.monotonic()
            await self.check_timeouts()

    def idempotency_cache(self) -> PostgresIdempotency:
        """Every replica on this database replays the others' answers to retried writes (postgres/idempotency.py)."""
        if self._idempotency is None:
            self._idempotency = PostgresIdempotency(self)
        return self._idempotency

    async def close(self) -> None:
        await self._close_connections()

    # ------------------------------------------------------------------ rollouts

    async def enqueue_rollout(
        self,
        input: Any,
        *,
        mode: RolloutMode | None = None,
        resources_id: str | None = None,
        config: RolloutConfig | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Rollout:
        item = {"input": input, "mode": mode, "resources_id": resources_id, "config": config, "metadata": metadata}
        return (await self.enqueue_rollouts([item]))[0]

    async def enqueue_rollouts(self, items: Sequence[dict[str, Any]]) -> list[Rollout]:
        """One transaction for the whole batch (a dataset epoch enqueues thousands)."""
        now = wall_now()
        rollouts = [lifecycle.new_rollout(now=now, **{"mode": None, "resources_id": None, "config": None,
                                                      "metadata": None, **item}) for item in items]  # fmt: skip
        if not rollouts:
            return []

        async def op(conn: Conn, finished: list[str]) -> list[Rollout]:
            await q.insert_rollouts(conn, rollouts)
            return rollouts

        return await self._write(op)

    async def dequeue_rollout(self, worker_id: str | None = None) -> AttemptedRollout | None:
        await self._maybe_sweep()

        async def op(conn: Conn, finished: list[str]) -> AttemptedRollout | None:
            row = await (await conn.execute(q.DEQUEUE_SQL)).fetchone()
            return await q.start(conn, rollout_from_row(row), worker_id) if row is not None else None

        return await self._write(op)

    async def start_rollout(
        self,
        input: Any,
        *,
        mode: RolloutMode | None = None,
        resources_id: str | None = None,
        config: RolloutConfig | None = None,
        metadata: dict[str, Any] | None = None,
        worker_id: str | None = None,
    ) -> AttemptedRollout:
        rollout = lifecycle.new_rollout(
            input, mode=mode, resources_id=resources_id, config=config, metadata=metadata, now=wall_now()
        )

        async def op(conn: Conn, finished: list[str]) -> AttemptedRollout:
            await q.insert_rollouts(conn, [rollout])
            return await q.start(conn, rollout, worker_id)

        return await self._write(op)

    async def get_rollout(self, rollout_id: str) -> Rollout:
        return await self._read(lambda conn: q.get_rollout(conn, rollout_id))

    async def query_rollouts(
        self,
        *,
        status: Sequence[RolloutStatus] | None = None,
        mode: RolloutMode | None = None,
        rollout_ids: Sequence[str] | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Rollout]:
        lifecycle.check_page(limit, offset)
        where, args = [], []
        if status is not None:
            where.append("status = ANY(%s)")
            args.append([RolloutStatus(s).value for s in status])
        if mode is not None:
            where.append("mode = %s")
            args.append(RolloutMode(mode).value)
        if rollout_ids is not None:
            where.append("rollout_id = ANY(%s)")
            args.append(list(rollout_ids))
        sql = f"SELECT {R_SELECT} FROM rollouts"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq LIMIT %s OFFSET %s"

        async def op(conn: Conn) -> list[Rollout]:
            cur = await conn.execute(sql, (*args, limit, offset))
            return [rollout_from_row(row) for row in await cur.fetchall()]

        return await self._read(op)

    async def update_rollout(
        self,
        rollout_id: str,
        *,
        status: RolloutStatus | None = None,
        mode: RolloutMode | None = None,
        resources_id: str | None = None,
        config: RolloutConfig | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Rollout:
        async def op(conn: Conn, finished: list[str]) -> Rollout:
            rollout = await q.get_rollout(conn, rollout_id, lock=True)
            change = lifecycle.update_rollout(
                rollout, await q.latest_attempt(conn, rollout),
                status=status, mode=mode, resources_id=resources_id, config=config, metadata=metadata,
                now=wall_now(),
            )  # fmt: skip
            await q.apply(conn, change, finished if not rollout.status.finished else [])
            return change.rollout or rollout

        return await self._write(op)

    async def wait_for_rollouts(self, rollout_ids: Sequence[str], timeout: float | None = None) -> list[Rollout]:
        """Sleeps until a notification names one of the rollouts, re-reading at most every poll_s without one."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        ids = list(rollout_ids)
        done: dict[str, Rollout] = {}  # finished is final, so only unfinished ids are re-read
        first = True
        while True:
            pending = [i for i in dict.fromkeys(ids) if i not in done]
            await self._ready()
            waiter = self._add_waiter(frozenset(pending))  # registered before reading: no finish slips by
            try:
                listening = await self._ensure_listening(LISTEN_START_S)
                await self._maybe_sweep()
                found = await self._read(lambda conn, ids_=pending: q.fetch_rollouts(conn, ids_))
                if first:
                    missing = [i for i in pending if i not in found]
                    if missing:
                        raise NotFoundError(f"rollouts not found: {', '.join(missing[:5])}")
                    first = False
                done.update({i: r for i, r in found.items() if r.status.finished})
                if len(done) == len(set(ids)) or (deadline is not None and loop.time() >= deadline):
                    return [done[i] for i in ids if i in done]
                poll_at = loop.time() + (self._poll_s if listening else UNHEARD_POLL_S)
                await self._sleep_until_woken(waiter, min(poll_at, deadline or poll_at))
            finally:
                self._remove_waiter(waiter)

    async def _sleep_until_woken(self, waiter: asyncio.Future[None], until: float) -> None:
        """Wait for the waiter or `until`, sweeping on this store's schedule meanwhile (without re-reading)."""
        loop = asyncio.get_running_loop()
        while not waiter.done() and (left := until - loop.time()) > 0:
            step = left if self._sweep_interval_s is None else min(left, self._sweep_interval_s)
            await asyncio.wait({waiter}, timeout=step)
            if not waiter.done():
                await self._maybe_sweep()  # a sweep that finishes one of ours wakes the waiter

    # ------------------------------------------------------------------ attempts

    async def query_attempts(self, rollout_id: str) -> list[Attempt]:
        async def op(conn: Conn) -> list[Attempt]:
            await q.get_rollout(conn, rollout_id)
            cur = await conn.execute(
                f"SELECT {A_SELECT} FROM attempts WHERE rollout_id = %s ORDER BY sequence_id", (rollout_id,)
            )
            return [attempt_from_row(row) for row in await cur.fetchall()]

        return await self._read(op, snapshot=True)

    async def attempt_statuses(self, rollout_id: str) -> dict[str, AttemptStatus]:
        """One statement: the gateway asks before every recorded LLM call."""

        async def op(conn: Conn) -> dict[str, AttemptStatus]:
            cur = await conn.execute(
                "SELECT a.attempt_id, a.status FROM rollouts r LEFT JOIN attempts a ON a.rollout_id = r.rollout_id "
                "WHERE r.rollout_id = %s",
                (rollout_id,),
            )
            rows = await cur.fetchall()
            if not rows:
                raise NotFoundError(f"rollout {rollout_id} not found")
            return {aid: AttemptStatus(status) for aid, status in rows if aid is not None}

        return await self._read(op)

    async def get_latest_attempt(self, rollout_id: str) -> Attempt | None:
        async def op(conn: Conn) -> Attempt | None:
            return await q.latest_attempt(conn, await q.get_rollout(conn, rollout_id))

        return await self._read(op, snapshot=True)

    async def update_attempt(
        self,
        rollout_id: str,
        attempt_id: str,
        *,
        status: AttemptStatus | None = None,
        worker_id: str | None = None,
        error: AttemptError | None = None,
    ) -> Attempt:
        async def op(conn: Conn, finished: list[str]) -> Attempt:
            rollout = await q.get_rollout(conn, rollout_id, lock=True)
            attempt = await q.get_attempt(conn, rollout_id, attempt_id)
            change = lifecycle.update_attempt(
                rollout, attempt, attempt.sequence_id == rollout.num_attempts,
                status=status, worker_id=worker_id, error=error, now=wall_now(),
            )  # fmt: skip
            await q.apply(conn, change, finished)
            return change.attempt or attempt

        return await self._write(op)

    # ------------------------------------------------------------------ spans

    async def add_spans(self, spans: Sequence[SpanIn]) -> list[Span]:
        """Spans already stored under (rollout_id, attempt_id, span_id) come back as stored, not added again."""
        if not spans:
            return []
        records, attributes_json = [], []
        for s in spans:
            rec, text = lifecycle.span_record_and_attributes_json(s)
            records.append(rec)
            attributes_json.append(text)

        async def op(conn: Conn, finished: list[str]) -> list[Span]:
            return await q.insert_spans(conn, records, attributes_json)

        return await self._write(op)

    async def query_spans(
        self,
        rollout_id: str,
        *,
        attempt_id: str | None = None,
        name: str | None = None,
        limit: int = 10_000,
        offset: int = 0,
    ) -> list[Span]:
        lifecycle.check_page(limit, offset)

        async def op(conn: Conn) -> list[Span]:
            rollout = await q.get_rollout(conn, rollout_id)
            where, args = ["rollout_id = %s"], [rollout_id]
            if attempt_id == "latest":
                latest = await q.latest_attempt(conn, rollout)
                if latest is None:
                    return []
                where.append("attempt_id = %s")
                args.append(latest.attempt_id)
            elif attempt_id is not None:
                await q.get_attempt(conn, rollout_id, attempt_id)
                where.append("attempt_id = %s")
                args.append(attempt_id)
            if name is not None:
                where.append("name = %s")
                args.append(name)
            cur = await conn.execute(
                f"SELECT {S_SELECT} FROM spans WHERE {' AND '.join(where)} "
                "ORDER BY attempt_seq, sequence_id LIMIT %s OFFSET %s",
                (*args, limit, offset),
            )
            return [span_from_row(row) for row in await cur.fetchall()]

        return await self._read(op, snapshot=True)

    # ------------------------------------------------------------------ resources

    async def add_resources(self, resources: ResourcesIn) -> Resources:
        data = resources.model_dump(mode="json")

        async def op(conn: Conn, finished: list[str]) -> Resources:
            # Versions count up across replicas: publishers take turns on this lock.
            await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(current_schema()))", (LOCK_RESOURCES,))
            row = await (await conn.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM resources")).fetchone()
            res = Resources.model_validate(
                {**data, "resources_id": new_id("res"), "version": row[0], "created_at": wall_now()}
            )
            await conn.execute(
                RES_INSERT,
                (res.resources_id, res.version, res.created_at, dumps(data["llms"]), dumps(data["prompts"]),
                 dumps(data["metadata"]), res.candidate),
            )  # fmt: skip
            return res

        return await self._write(op)

    async def get_resources(self, resources_id: str) -> Resources:
        async def op(conn: Conn) -> Resources:
            cur = await conn.execute(f"SELECT {RES_SELECT} FROM resources WHERE resources_id = %s", (resources_id,))
            row = await cur.fetchone()
            if row is None:
                raise NotFoundError(f"resources {resources_id} not found")
            return resources_from_row(row)

        return await self._read(op)

    async def get_latest_resources(self) -> Resources | None:
        return await self._read(q.latest_deployed)

    async def query_resources(self, *, limit: int = 100, offset: int = 0) -> list[Resources]:
        lifecycle.check_page(limit, offset)

        async def op(conn: Conn) -> list[Resources]:
            cur = await conn.execute(
                f"SELECT {RES_SELECT} FROM resources ORDER BY version LIMIT %s OFFSET %s", (limit, offset)
            )
            return [resources_from_row(row) for row in await cur.fetchall()]

        return await self._read(op)

    # ------------------------------------------------------------------ workers

    async def heartbeat_worker(
        self,
        worker_id: str,
        *,
        status: WorkerStatus | None = None,
        current_rollout_id: str | None = None,
        current_attempt_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Worker:
        async def op(conn: Conn, finished: list[str]) -> Worker:
            select = f"SELECT {W_SELECT} FROM workers WHERE worker_id = %s FOR UPDATE"
            row = await (await conn.execute(select, (worker_id,))).fetchone()
            old = worker_from_row(row) if row is not None else Worker(worker_id=worker_id)
            w = lifecycle.worker_heartbeat(
                old, status=status, current_rollout_id=current_rollout_id,
                current_attempt_id=current_attempt_id, metadata=metadata, now=wall_now(),
            )  # fmt: skip
            await conn.execute(
                W_UPSERT,
                (w.worker_id, w.status.value, w.last_heartbeat, w.current_rollout_id, w.current_attempt_id,
                 dumps(w.metadata)),
            )  # fmt: skip
            return w

        return await self._write(op)

    async def query_workers(self) -> list[Worker]:
        async def op(conn: Conn) -> list[Worker]:
            cur = await conn.execute(f"SELECT {W_SELECT} FROM workers ORDER BY seq")
            return [worker_from_row(row) for row in await cur.fetchall()]

        return await self._read(op)

    # ------------------------------------------------------------------ lifecycle

    async def check_timeouts(self, now: float | None = None) -> list[Attempt]:
        """One replica at a time: a sweep that finds another one's advisory lock taken changes nothing."""

        async def op(conn: Conn, finished: list[str]) -> list[Attempt]:
            return await q.sweep(conn, wall_now() if now is None else now, finished)

        changed = await self._write(op)
        self._last_sweep = time.monotonic()
        return changed
