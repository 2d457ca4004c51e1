"""Durable default store: one SQLite file in WAL mode, safe to share between processes.

How work reaches the file (database thread with group commit, or the caller's own connection for
small reads and lone writes) is `sqlite_connections`. This module holds the Store methods; the
schema, row conversion and shared statements live in `sqlite_schema`, `sqlite_rows` and
`sqlite_queries`. Lifecycle rules come
from `lifecycle`, shared with the memory store.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

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
from agentkiln.models import (
    now as wall_now,
)
from agentkiln.store import lifecycle
from agentkiln.store import sqlite_queries as q
from agentkiln.store.base import NotFoundError, Store
from agentkiln.store.sqlite_connections import SqliteConnections
from agentkiln.store.sqlite_production import SqliteProduction
from agentkiln.store.sqlite_responses import SqliteResponses
from agentkiln.store.sqlite_rows import (
    A_COLS,
    R_COLS,
    RES_COLS,
    S_COLS,
    W_COLS,
    attempt_from_row,
    dumps,
    resources_from_row,
    rollout_from_row,
    span_from_row,
    worker_from_row,
)
from agentkiln.store.sqlite_schema import SCHEMA_VERSION
from agentkiln.store.sqlite_worker import deliver

__all__ = ["SCHEMA_VERSION", "SqliteStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")

POLL_S = 0.25  # wait_for_rollouts re-reads the file this often (other processes may finish rollouts)
DIRECT_WRITE_MAX_SPANS = 16  # larger span batches always join the group commit


class SqliteStore(SqliteProduction, SqliteResponses, SqliteConnections, Store):
    """Store in one SQLite file; several SqliteStores (processes) may share the file."""

    def __init__(self, path: str | Path, *, sweep_interval_s: float | None = 1.0) -> None:
        super().__init__(path)
        self._waiters: set[asyncio.Future] = set()
        self._sweep_interval_s = sweep_interval_s
        self._last_sweep = time.monotonic()

    def _notify_finished(self) -> None:
        """Wake this process's wait_for_rollouts callers (other processes are seen by polling)."""
        for w in list(self._waiters):
            if not w.done():
                w.get_loop().call_soon_threadsafe(deliver, w, None, None)

    async def _maybe_sweep(self) -> None:
        if self._sweep_interval_s is not None and time.monotonic() - self._last_sweep >= self._sweep_interval_s:
            self._last_sweep = time.monotonic()
            await self.check_timeouts()

    async def close(self) -> None:
        if self._closed:
            return
        await self._close_connections()

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

        def op(conn: sqlite3.Connection) -> list[Rollout]:
            q.insert_rollouts(conn, rollouts)
            return rollouts

        return await self._call(op)

    async def dequeue_rollout(self, worker_id: str | None = None) -> AttemptedRollout | None:
        await self._maybe_sweep()

        def op(conn: sqlite3.Connection) -> AttemptedRollout | None:
            row = conn.execute(q.DEQUEUE_SQL).fetchone()
            return q.start(conn, rollout_from_row(row), worker_id) if row is not None else None

        return await self._call(op)

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

        def op(conn: sqlite3.Connection) -> AttemptedRollout:
            q.insert_rollouts(conn, [rollout])
            return q.start(conn, rollout, worker_id)

        return await self._call(op)

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
            where.append("status IN (SELECT value FROM json_each(?))")
            args.append(dumps([RolloutStatus(s).value for s in status]))
        if mode is not None:
            where.append("mode = ?")
            args.append(RolloutMode(mode).value)
        if rollout_ids is not None:
            where.append("rollout_id IN (SELECT value FROM json_each(?))")
            args.append(dumps(list(rollout_ids)))
        sql = f"SELECT {R_COLS} FROM rollouts"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq LIMIT ? OFFSET ?"

        def op(conn: sqlite3.Connection) -> list[Rollout]:
            return [rollout_from_row(row) for row in conn.execute(sql, (*args, limit, offset))]

        return await self._call(op, write=False)

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
        def op(conn: sqlite3.Connection) -> tuple[Rollout, bool]:
            rollout = q.get_rollout(conn, rollout_id)
            change = lifecycle.update_rollout(
                rollout, q.latest_attempt(conn, rollout),
                status=status, mode=mode, resources_id=resources_id, config=config, metadata=metadata,
                now=wall_now(),
            )  # fmt: skip
            finished = q.apply(conn, change) and not rollout.status.finished
            return change.rollout or rollout, finished

        result, finished = await self._call(op)
        if finished:
            self._notify_finished()
        return result

    async def wait_for_rollouts(self, rollout_ids: Sequence[str], timeout: float | None = None) -> list[Rollout]:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        ids = list(rollout_ids)
        done: dict[str, Rollout] = {}  # finished is final, so only unfinished ids are re-read
        first = True
        while True:
            waiter: asyncio.Future = loop.create_future()
            self._waiters.add(waiter)  # registered before reading: a finish in between still wakes us
            try:
                await self._maybe_sweep()
                pending = [i for i in dict.fromkeys(ids) if i not in done]
                found = await self._call(lambda conn, ids_=pending: q.fetch_rollouts(conn, ids_), write=False)
                if first:
                    missing = [i for i in pending if i not in found]
                    if missing:
                        raise NotFoundError(f"rollouts not found: {', '.join(missing[:5])}")
                    first = False
                done.update({i: r for i, r in found.items() if r.status.finished})
                remaining = None if deadline is None else deadline - loop.time()
                if len(done) == len(set(ids)) or (remaining is not None and remaining <= 0):
                    return [done[i] for i in ids if i in done]
                step = POLL_S if remaining is None else min(POLL_S, remaining)
                try:
                    await asyncio.wait_for(waiter, step)
                except TimeoutError:
                    pass
            finally:
                self._waiters.discard(waiter)

    # ------------------------------------------------------------------ attempts

    async def query_attempts(self, rollout_id: str) -> list[Attempt]:
        def op(conn: sqlite3.Connection) -> list[Attempt]:
            q.get_rollout(conn, rollout_id)
            rows = conn.execute(
                f"SELECT {A_COLS} FROM attempts WHERE rollout_id = ? ORDER BY sequence_id", (rollout_id,)
            )
            return [attempt_from_row(row) for row in rows]

        return await self._read(op)

    async def attempt_statuses(self, rollout_id: str) -> dict[str, AttemptStatus]:
        def op(conn: sqlite3.Connection) -> dict[str, AttemptStatus]:
            rows = conn.execute(
                "SELECT a.attempt_id, a.status FROM rollouts r LEFT JOIN attempts a ON a.rollout_id = r.rollout_id "
                "WHERE r.rollout_id = ?",
                (rollout_id,),
            ).fetchall()
            if not rows:
                raise NotFoundError(f"rollout {rollout_id} not found")
            return {aid: AttemptStatus(status) for aid, status in rows if aid is not None}

        return await self._read(op)

    async def get_latest_attempt(self, rollout_id: str) -> Attempt | None:
        return await self._read(lambda conn: q.latest_attempt(conn, q.get_rollout(conn, rollout_id)))

    async def update_attempt(
        self,
        rollout_id: str,
        attempt_id: str,
        *,
        status: AttemptStatus | None = None,
        worker_id: str | None = None,
        error: AttemptError | None = None,
    ) -> Attempt:
        def op(conn: sqlite3.Connection) -> tuple[Attempt, bool]:
            rollout = q.get_rollout(conn, rollout_id)
            attempt = q.get_attempt(conn, rollout_id, attempt_id)
            change = lifecycle.update_attempt(
                rollout, attempt, attempt.sequence_id == rollout.num_attempts,
                status=status, worker_id=worker_id, error=error, now=wall_now(),
            )  # fmt: skip
            return change.attempt or attempt, q.apply(conn, change)

        result, finished = await self._call(op)
        if finished:
            self._notify_finished()
        return result

    # ------------------------------------------------------------------ spans

    async def add_spans(self, spans: Sequence[SpanIn]) -> list[Span]:
        """Spans already stored under (rollout_id, attempt_id, span_id) come back as stored, not added again.

        A client retrying after the commit but before the answer (even to a restarted server)
        thus never stores a span twice. Lookup and insert share one write transaction, and the
        span key index backs it up against any other writer.
        """
        records, attributes_json = [], []
        for s in spans:
            rec, text = lifecycle.span_record_and_attributes_json(s)
            records.append(rec)
            attributes_json.append(text)

        def op(conn: sqlite3.Connection) -> list[Span]:
            return q.insert_spans(conn, records, attributes_json)

        return await self._write(op) if len(records) <= DIRECT_WRITE_MAX_SPANS else await self._call(op)

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

        def op(conn: sqlite3.Connection) -> list[Span]:
            rollout = q.get_rollout(conn, rollout_id)
            where, args = ["rollout_id = ?"], [rollout_id]
            if attempt_id == "latest":
                latest = q.latest_attempt(conn, rollout)
                if latest is None:
                    return []
                where.append("attempt_id = ?")
                args.append(latest.attempt_id)
            elif attempt_id is not None:
                q.get_attempt(conn, rollout_id, attempt_id)
                where.append("attempt_id = ?")
                args.append(attempt_id)
            if name is not None:
                where.append("name = ?")
                args.append(name)
            sql = (
                f"SELECT {S_COLS} FROM spans WHERE {' AND '.join(where)} "
                "ORDER BY attempt_seq, sequence_id LIMIT ? OFFSET ?"
            )
            return [span_from_row(row) for row in conn.execute(sql, (*args, limit, offset))]

        return await self._call(op, write=False)

    # ------------------------------------------------------------------ resources

    async def add_resources(self, resources: ResourcesIn) -> Resources:
        data = resources.model_dump(mode="json")

        def op(conn: sqlite3.Connection) -> Resources:
            version = conn.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM resources").fetchone()[0]
            res = Resources.model_validate(
                {**data, "resources_id": new_id("res"), "version": version, "created_at": wall_now()}
            )
            conn.execute(
                f"INSERT INTO resources ({RES_COLS}) VALUES (?,?,?,?,?,?,?)",
                (res.resources_id, version, res.created_at, dumps(data["llms"]), dumps(data["prompts"]),
                 dumps(data["metadata"]), int(res.candidate)),
            )  # fmt: skip
            return res

        return await self._call(op)

    async def get_resources(self, resources_id: str) -> Resources:
        def op(conn: sqlite3.Connection) -> Resources:
            row = conn.execute(f"SELECT {RES_COLS} FROM resources WHERE resources_id = ?", (resources_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"resources {resources_id} not found")
            return resources_from_row(row)

        return await self._call(op, write=False)

    async def get_latest_resources(self) -> Resources | None:
        def op(conn: sqlite3.Connection) -> Resources | None:
            return q.latest_deployed(conn)

        return await self._call(op, write=False)

    async def query_resources(self, *, limit: int = 100, offset: int = 0) -> list[Resources]:
        lifecycle.check_page(limit, offset)

        def op(conn: sqlite3.Connection) -> list[Resources]:
            rows = conn.execute(f"SELECT {RES_COLS} FROM resources ORDER BY version LIMIT ? OFFSET ?", (limit, offset))
            return [resources_from_row(row) for row in rows]

        return await self._call(op, write=False)

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
        def op(conn: sqlite3.Connection) -> Worker:
            row = conn.execute(f"SELECT {W_COLS} FROM workers WHERE worker_id = ?", (worker_id,)).fetchone()
            old = worker_from_row(row) if row is not None else Worker(worker_id=worker_id)
            w = lifecycle.worker_heartbeat(
                old, status=status, current_rollout_id=current_rollout_id,
                current_attempt_id=current_attempt_id, metadata=metadata, now=wall_now(),
            )  # fmt: skip
            conn.execute(
                f"INSERT OR REPLACE INTO workers ({W_COLS}) VALUES (?,?,?,?,?,?)",
                (w.worker_id, w.status.value, w.last_heartbeat, w.current_rollout_id, w.current_attempt_id,
                 dumps(w.metadata)),
            )  # fmt: skip
            return w

        return await self._call(op)

    async def query_workers(self) -> list[Worker]:
        def op(conn: sqlite3.Connection) -> list[Worker]:
            return [worker_from_row(row) for row in conn.execute(f"SELECT {W_COLS} FROM workers ORDER BY rowid")]

        return await self._call(op, write=False)

    # ------------------------------------------------------------------ lifecycle

    async def check_timeouts(self, now: float | None = None) -> list[Attempt]:
        def op(conn: sqlite3.Connection) -> tuple[list[Attempt], bool]:
            at = wall_now() if now is None else now
            rows = conn.execute(f"SELECT {A_COLS} FROM attempts WHERE status = 'running'").fetchall()
            changed, finished = [], False
            for row in rows:
                attempt = attempt_from_row(row)
                rollout = q.get_rollout(conn, attempt.rollout_id)
                change = lifecycle.sweep_attempt(rollout, attempt, attempt.sequence_id == rollout.num_attempts, at)
                if change is not None:
                    finished = q.apply(conn, change) or finished
                    changed.append(change.attempt)
            return changed, finished

        changed, finished = await self._call(op)
        self._last_sweep = time.monotonic()
        if finished:
            self._notify_finished()
        return changed
