"""Durable default store: one SQLite file in WAL mode, safe to share between processes.

All database work of one SqliteStore runs on one dedicated thread owning one connection.
That thread drains every request waiting in its queue into a single transaction (group
commit), so a hundred runners adding spans at once cost one fsync-free WAL commit, not a
hundred. Each request runs inside its own SAVEPOINT, so one caller's error (unknown id,
invalid transition) rolls back only that caller's work. Writes use BEGIN IMMEDIATE, which
takes SQLite's write lock up front: two processes sharing the file can never dequeue the
same rollout. A call returns only after its transaction committed (WAL + synchronous=NORMAL
survives a killed process). Lifecycle rules come from `lifecycle`, shared with the memory store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
from agentkiln.store.base import NotFoundError, Store, StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 1
MAX_BATCH = 512  # requests per group-commit transaction
POLL_S = 0.25  # wait_for_rollouts re-reads the file this often (other processes may finish rollouts)

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS rollouts (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- creation order, drives FIFO
        rollout_id TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL,
        mode TEXT,
        input TEXT NOT NULL,  -- JSON
        resources_id TEXT,
        config TEXT NOT NULL,  -- JSON
        metadata TEXT NOT NULL,  -- JSON
        created_at REAL NOT NULL,
        start_time REAL,
        end_time REAL,
        num_attempts INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX IF NOT EXISTS rollouts_waiting ON rollouts(seq) WHERE status IN ('queuing', 'requeuing')",
    "CREATE INDEX IF NOT EXISTS rollouts_status ON rollouts(status, seq)",
    """CREATE TABLE IF NOT EXISTS attempts (
        attempt_id TEXT PRIMARY KEY,
        rollout_id TEXT NOT NULL,
        sequence_id INTEGER NOT NULL,
        worker_id TEXT,
        status TEXT NOT NULL,
        start_time REAL NOT NULL,
        end_time REAL,
        last_heartbeat REAL NOT NULL,
        error TEXT,  -- JSON
        UNIQUE (rollout_id, sequence_id)
    )""",
    "CREATE INDEX IF NOT EXISTS attempts_running ON attempts(rollout_id) WHERE status = 'running'",
    """CREATE TABLE IF NOT EXISTS spans (
        id INTEGER PRIMARY KEY,
        rollout_id TEXT NOT NULL,
        attempt_id TEXT NOT NULL,
        attempt_seq INTEGER NOT NULL,
        sequence_id INTEGER NOT NULL,
        name TEXT NOT NULL,
        trace_id TEXT NOT NULL,
        span_id TEXT NOT NULL,
        parent_id TEXT,
        start_time REAL NOT NULL,
        end_time REAL,
        attributes TEXT NOT NULL,  -- JSON
        events TEXT NOT NULL,  -- JSON
        status TEXT NOT NULL,  -- JSON
        resource TEXT NOT NULL  -- JSON
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS spans_by_attempt ON spans(rollout_id, attempt_id, sequence_id)",
    "CREATE INDEX IF NOT EXISTS spans_by_rollout ON spans(rollout_id, attempt_seq, sequence_id)",
    """CREATE TABLE IF NOT EXISTS resources (
        resources_id TEXT PRIMARY KEY,
        version INTEGER NOT NULL UNIQUE,
        created_at REAL NOT NULL,
        llms TEXT NOT NULL,  -- JSON
        prompts TEXT NOT NULL,  -- JSON
        metadata TEXT NOT NULL  -- JSON
    )""",
    """CREATE TABLE IF NOT EXISTS workers (
        worker_id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        last_heartbeat REAL NOT NULL,
        current_rollout_id TEXT,
        current_attempt_id TEXT,
        metadata TEXT NOT NULL  -- JSON
    )""",
]

# --------------------------------------------------------------------------- rows <-> models

_R_COLS = (
    "rollout_id, status, mode, input, resources_id, config, metadata, created_at, start_time, end_time, num_attempts"
)
_A_COLS = "attempt_id, rollout_id, sequence_id, worker_id, status, start_time, end_time, last_heartbeat, error"
_S_COLS = (
    "rollout_id, attempt_id, sequence_id, name, trace_id, span_id, parent_id, start_time, end_time, "
    "attributes, events, status, resource"
)
_RES_COLS = "resources_id, version, created_at, llms, prompts, metadata"
_W_COLS = "worker_id, status, last_heartbeat, current_rollout_id, current_attempt_id, metadata"
_WAITING = "status IN ('queuing', 'requeuing')"
# INDEXED BY: without statistics the planner prefers rollouts_status plus a sort of every waiting row.
_DEQUEUE_SQL = f"SELECT {_R_COLS} FROM rollouts INDEXED BY rollouts_waiting WHERE {_WAITING} ORDER BY seq LIMIT 1"


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _rollout(row: Sequence[Any]) -> Rollout:
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


def _rollout_values(r: Rollout) -> tuple[Any, ...]:
    return (
        r.rollout_id,
        r.status.value,
        r.mode.value if r.mode is not None else None,
        _dumps(r.input),
        r.resources_id,
        r.config.model_dump_json(),
        _dumps(r.metadata),
        r.created_at,
        r.start_time,
        r.end_time,
        r.num_attempts,
    )


def _attempt(row: Sequence[Any]) -> Attempt:
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


def _attempt_values(a: Attempt) -> tuple[Any, ...]:
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


def _span(row: Sequence[Any]) -> Span:
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


def _resources(row: Sequence[Any]) -> Resources:
    return Resources.model_validate(
        {
            "resources_id": row[0],
            "version": row[1],
            "created_at": row[2],
            "llms": json.loads(row[3]),
            "prompts": json.loads(row[4]),
            "metadata": json.loads(row[5]),
        }
    )


def _worker(row: Sequence[Any]) -> Worker:
    return Worker(
        worker_id=row[0],
        status=WorkerStatus(row[1]),
        last_heartbeat=row[2],
        current_rollout_id=row[3],
        current_attempt_id=row[4],
        metadata=json.loads(row[5]),
    )


# --------------------------------------------------------------------------- statements used by ops


def _get_rollout(conn: sqlite3.Connection, rollout_id: str) -> Rollout:
    row = conn.execute(f"SELECT {_R_COLS} FROM rollouts WHERE rollout_id = ?", (rollout_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"rollout {rollout_id} not found")
    return _rollout(row)


def _get_attempt(conn: sqlite3.Connection, rollout_id: str, attempt_id: str) -> Attempt:
    row = conn.execute(
        f"SELECT {_A_COLS} FROM attempts WHERE attempt_id = ? AND rollout_id = ?", (attempt_id, rollout_id)
    ).fetchone()
    if row is None:
        raise NotFoundError(f"attempt {attempt_id} of rollout {rollout_id} not found")
    return _attempt(row)


def _latest_attempt(conn: sqlite3.Connection, rollout: Rollout) -> Attempt | None:
    row = conn.execute(
        f"SELECT {_A_COLS} FROM attempts WHERE rollout_id = ? AND sequence_id = ?",
        (rollout.rollout_id, rollout.num_attempts),
    ).fetchone()
    return _attempt(row) if row is not None else None


def _insert_rollout(conn: sqlite3.Connection, r: Rollout) -> None:
    conn.execute(f"INSERT INTO rollouts ({_R_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", _rollout_values(r))


def _save_rollout(conn: sqlite3.Connection, r: Rollout) -> None:
    v = _rollout_values(r)
    conn.execute(
        "UPDATE rollouts SET status=?, mode=?, resources_id=?, config=?, metadata=?, start_time=?, end_time=?, "
        "num_attempts=? WHERE rollout_id=?",
        (v[1], v[2], v[4], v[5], v[6], v[8], v[9], v[10], v[0]),
    )


def _insert_attempt(conn: sqlite3.Connection, a: Attempt) -> None:
    conn.execute(f"INSERT INTO attempts ({_A_COLS}) VALUES (?,?,?,?,?,?,?,?,?)", _attempt_values(a))


def _save_attempt(conn: sqlite3.Connection, a: Attempt) -> None:
    v = _attempt_values(a)
    conn.execute(
        "UPDATE attempts SET worker_id=?, status=?, end_time=?, last_heartbeat=?, error=? WHERE attempt_id=?",
        (v[3], v[4], v[6], v[7], v[8], v[0]),
    )


def _apply(conn: sqlite3.Connection, change: lifecycle.Change) -> bool:
    """Persist a lifecycle change; True if it finished a rollout (waiters must look)."""
    if change.attempt is not None:
        _save_attempt(conn, change.attempt)
    if change.rollout is not None:
        _save_rollout(conn, change.rollout)
        return change.rollout.status.finished
    return False


def _start(conn: sqlite3.Connection, rollout: Rollout, worker_id: str | None) -> AttemptedRollout:
    change = lifecycle.start_attempt(rollout, worker_id, wall_now())
    assert change.rollout is not None and change.attempt is not None
    _insert_attempt(conn, change.attempt)
    _save_rollout(conn, change.rollout)
    return AttemptedRollout(rollout=change.rollout, attempt=change.attempt)


def _fetch_rollouts(conn: sqlite3.Connection, rollout_ids: Sequence[str]) -> dict[str, Rollout]:
    rows = conn.execute(
        f"SELECT {_R_COLS} FROM rollouts WHERE rollout_id IN (SELECT value FROM json_each(?))",
        (_dumps(list(rollout_ids)),),
    ).fetchall()
    return {row[0]: _rollout(row) for row in rows}


# --------------------------------------------------------------------------- the DB thread


@dataclass
class _Request:
    fn: Callable[[sqlite3.Connection], Any]
    write: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


def _deliver(future: asyncio.Future, value: Any, exc: BaseException | None) -> None:
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)


class _DbThread:
    """Owns the connection; runs queued requests in group-commit transactions."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._open_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"agentkiln-sqlite:{path}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._open_error is not None:
            raise self._open_error

    def submit(self, request: _Request) -> None:
        self._queue.put(request)

    def request_stop(self) -> None:
        """Finish queued work, then close the connection (does not wait)."""
        self._queue.put(None)

    def stop(self) -> None:
        self.request_stop()
        self._thread.join()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, timeout=30.0, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _SCHEMA:
                conn.execute(stmt)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self._path} has schema version {version}, newer than this agentkiln")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            conn.close()
            raise
        return conn

    def _run(self) -> None:
        try:
            conn = self._connect()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the constructor's thread
            self._open_error = exc
            self._ready.set()
            return
        self._ready.set()
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            self._execute(conn, batch)
        conn.close()

    def _execute(self, conn: sqlite3.Connection, batch: list[_Request]) -> None:
        write = any(r.write for r in batch)
        results: list[tuple[Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            for r in batch:
                results.append(self._one(conn, r))
            conn.execute("COMMIT")
        except Exception as exc:  # BEGIN/COMMIT failed: nothing of this batch is durable
            log.exception("sqlite transaction of %d requests failed", len(batch))
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("sqlite rollback failed")
            results = [(None, exc)] * len(batch)
        for r, (value, exc) in zip(batch, results):
            try:
                r.loop.call_soon_threadsafe(_deliver, r.future, value, exc)
            except RuntimeError:  # the caller's loop is gone
                pass

    @staticmethod
    def _one(conn: sqlite3.Connection, r: _Request) -> tuple[Any, BaseException | None]:
        if not r.write:
            try:
                return r.fn(conn), None
            except Exception as exc:  # noqa: BLE001 - handed to the caller's future
                return None, exc
        conn.execute("SAVEPOINT op")
        try:
            value = r.fn(conn)
        except Exception as exc:  # noqa: BLE001 - handed to the caller's future
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            return None, exc
        conn.execute("RELEASE op")
        return value, None


# --------------------------------------------------------------------------- the store


class SqliteStore(Store):
    """Store in one SQLite file; several SqliteStores (processes) may share the file."""

    def __init__(self, path: str | Path, *, sweep_interval_s: float | None = 1.0) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = _DbThread(self.path)
        # A store dropped without close() still releases its thread and connection.
        self._finalizer = weakref.finalize(self, self._db.request_stop)
        self._closed = False
        self._waiters: set[asyncio.Future] = set()
        self._sweep_interval_s = sweep_interval_s
        self._last_sweep = time.monotonic()

    async def _call(self, fn: Callable[[sqlite3.Connection], T], *, write: bool = True) -> T:
        if self._closed:
            raise StoreError("store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._db.submit(_Request(fn, write, loop, future))
        return await future

    def _notify_finished(self) -> None:
        """Wake this process's wait_for_rollouts callers (other processes are seen by polling)."""
        for w in list(self._waiters):
            if not w.done():
                w.get_loop().call_soon_threadsafe(_deliver, w, None, None)

    async def _maybe_sweep(self) -> None:
        if self._sweep_interval_s is not None and time.monotonic() - self._last_sweep >= self._sweep_interval_s:
            self._last_sweep = time.monotonic()
            await self.check_timeouts()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        await asyncio.to_thread(self._db.stop)

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

        def op(conn: sqlite3.Connection) -> list[Rollout]:
            conn.executemany(
                f"INSERT INTO rollouts ({_R_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                [_rollout_values(r) for r in rollouts],
            )
            return rollouts

        return await self._call(op)

    async def dequeue_rollout(self, worker_id: str | None = None) -> AttemptedRollout | None:
        await self._maybe_sweep()

        def op(conn: sqlite3.Connection) -> AttemptedRollout | None:
            row = conn.execute(_DEQUEUE_SQL).fetchone()
            return _start(conn, _rollout(row), worker_id) if row is not None else None

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
            _insert_rollout(conn, rollout)
            return _start(conn, rollout, worker_id)

        return await self._call(op)

    async def get_rollout(self, rollout_id: str) -> Rollout:
        return await self._call(lambda conn: _get_rollout(conn, rollout_id), write=False)

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
            args.append(_dumps([RolloutStatus(s).value for s in status]))
        if mode is not None:
            where.append("mode = ?")
            args.append(RolloutMode(mode).value)
        if rollout_ids is not None:
            where.append("rollout_id IN (SELECT value FROM json_each(?))")
            args.append(_dumps(list(rollout_ids)))
        sql = f"SELECT {_R_COLS} FROM rollouts"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq LIMIT ? OFFSET ?"

        def op(conn: sqlite3.Connection) -> list[Rollout]:
            return [_rollout(row) for row in conn.execute(sql, (*args, limit, offset))]

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
            rollout = _get_rollout(conn, rollout_id)
            change = lifecycle.update_rollout(
                rollout, _latest_attempt(conn, rollout),
                status=status, mode=mode, resources_id=resources_id, config=config, metadata=metadata,
                now=wall_now(),
            )  # fmt: skip
            finished = _apply(conn, change) and not rollout.status.finished
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
                found = await self._call(lambda conn, ids_=pending: _fetch_rollouts(conn, ids_), write=False)
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
            _get_rollout(conn, rollout_id)
            rows = conn.execute(
                f"SELECT {_A_COLS} FROM attempts WHERE rollout_id = ? ORDER BY sequence_id", (rollout_id,)
            )
            return [_attempt(row) for row in rows]

        return await self._call(op, write=False)

    async def get_latest_attempt(self, rollout_id: str) -> Attempt | None:
        return await self._call(lambda conn: _latest_attempt(conn, _get_rollout(conn, rollout_id)), write=False)

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
            rollout = _get_rollout(conn, rollout_id)
            attempt = _get_attempt(conn, rollout_id, attempt_id)
            change = lifecycle.update_attempt(
                rollout, attempt, attempt.sequence_id == rollout.num_attempts,
                status=status, worker_id=worker_id, error=error, now=wall_now(),
            )  # fmt: skip
            return change.attempt or attempt, _apply(conn, change)

        result, finished = await self._call(op)
        if finished:
            self._notify_finished()
        return result

    # ------------------------------------------------------------------ spans

    async def add_spans(self, spans: Sequence[SpanIn]) -> list[Span]:
        records = [lifecycle.span_record(s) for s in spans]

        def op(conn: sqlite3.Connection) -> list[Span]:
            owners: dict[tuple[str, str], tuple[Rollout, Attempt, int]] = {}
            for rec in records:  # validate the whole batch before storing any of it
                key = (rec["rollout_id"], rec["attempt_id"])
                if key not in owners:
                    rollout = _get_rollout(conn, key[0])
                    attempt = _get_attempt(conn, *key)
                    last = conn.execute(
                        "SELECT COALESCE(MAX(sequence_id), 0) FROM spans WHERE rollout_id = ? AND attempt_id = ?", key
                    ).fetchone()[0]
                    owners[key] = (rollout, attempt, last)
            out, rows = [], []
            for rec in records:
                key = (rec["rollout_id"], rec["attempt_id"])
                rollout, attempt, last = owners[key]
                owners[key] = (rollout, attempt, last + 1)
                out.append(Span.model_validate({**rec, "sequence_id": last + 1}))
                rows.append(
                    (
                        *key, attempt.sequence_id, last + 1, rec["name"], rec["trace_id"], rec["span_id"],
                        rec["parent_id"], rec["start_time"], rec["end_time"], _dumps(rec["attributes"]),
                        _dumps(rec["events"]), _dumps(rec["status"]), _dumps(rec["resource"]),
                    )
                )  # fmt: skip
            conn.executemany(
                "INSERT INTO spans (rollout_id, attempt_id, attempt_seq, sequence_id, name, trace_id, span_id, "
                "parent_id, start_time, end_time, attributes, events, status, resource) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
            now = wall_now()
            for rollout, attempt, _ in owners.values():
                is_latest = attempt.sequence_id == rollout.num_attempts
                _apply(conn, lifecycle.record_activity(rollout, attempt, is_latest, now))
            return out

        return await self._call(op)

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
            rollout = _get_rollout(conn, rollout_id)
            where, args = ["rollout_id = ?"], [rollout_id]
            if attempt_id == "latest":
                latest = _latest_attempt(conn, rollout)
                if latest is None:
                    return []
                where.append("attempt_id = ?")
                args.append(latest.attempt_id)
            elif attempt_id is not None:
                _get_attempt(conn, rollout_id, attempt_id)
                where.append("attempt_id = ?")
                args.append(attempt_id)
            if name is not None:
                where.append("name = ?")
                args.append(name)
            sql = (
                f"SELECT {_S_COLS} FROM spans WHERE {' AND '.join(where)} "
                "ORDER BY attempt_seq, sequence_id LIMIT ? OFFSET ?"
            )
            return [_span(row) for row in conn.execute(sql, (*args, limit, offset))]

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
                f"INSERT INTO resources ({_RES_COLS}) VALUES (?,?,?,?,?,?)",
                (res.resources_id, version, res.created_at, _dumps(data["llms"]), _dumps(data["prompts"]),
                 _dumps(data["metadata"])),
            )  # fmt: skip
            return res

        return await self._call(op)

    async def get_resources(self, resources_id: str) -> Resources:
        def op(conn: sqlite3.Connection) -> Resources:
            row = conn.execute(f"SELECT {_RES_COLS} FROM resources WHERE resources_id = ?", (resources_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"resources {resources_id} not found")
            return _resources(row)

        return await self._call(op, write=False)

    async def get_latest_resources(self) -> Resources | None:
        def op(conn: sqlite3.Connection) -> Resources | None:
            row = conn.execute(f"SELECT {_RES_COLS} FROM resources ORDER BY version DESC LIMIT 1").fetchone()
            return _resources(row) if row is not None else None

        return await self._call(op, write=False)

    async def query_resources(self, *, limit: int = 100, offset: int = 0) -> list[Resources]:
        lifecycle.check_page(limit, offset)

        def op(conn: sqlite3.Connection) -> list[Resources]:
            rows = conn.execute(f"SELECT {_RES_COLS} FROM resources ORDER BY version LIMIT ? OFFSET ?", (limit, offset))
            return [_resources(row) for row in rows]

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
            row = conn.execute(f"SELECT {_W_COLS} FROM workers WHERE worker_id = ?", (worker_id,)).fetchone()
            old = _worker(row) if row is not None else Worker(worker_id=worker_id)
            w = lifecycle.worker_heartbeat(
                old, status=status, current_rollout_id=current_rollout_id,
                current_attempt_id=current_attempt_id, metadata=metadata, now=wall_now(),
            )  # fmt: skip
            conn.execute(
                f"INSERT OR REPLACE INTO workers ({_W_COLS}) VALUES (?,?,?,?,?,?)",
                (w.worker_id, w.status.value, w.last_heartbeat, w.current_rollout_id, w.current_attempt_id,
                 _dumps(w.metadata)),
            )  # fmt: skip
            return w

        return await self._call(op)

    async def query_workers(self) -> list[Worker]:
        def op(conn: sqlite3.Connection) -> list[Worker]:
            return [_worker(row) for row in conn.execute(f"SELECT {_W_COLS} FROM workers ORDER BY rowid")]

        return await self._call(op, write=False)

    # ------------------------------------------------------------------ lifecycle

    async def check_timeouts(self, now: float | None = None) -> list[Attempt]:
        def op(conn: sqlite3.Connection) -> tuple[list[Attempt], bool]:
            at = wall_now() if now is None else now
            rows = conn.execute(f"SELECT {_A_COLS} FROM attempts WHERE status = 'running'").fetchall()
            changed, finished = [], False
            for row in rows:
                attempt = _attempt(row)
                rollout = _get_rollout(conn, attempt.rollout_id)
                change = lifecycle.sweep_attempt(rollout, attempt, attempt.sequence_id == rollout.num_attempts, at)
                if change is not None:
                    finished = _apply(conn, change) or finished
                    changed.append(change.attempt)
            return changed, finished

        changed, finished = await self._call(op)
        self._last_sweep = time.monotonic()
        if finished:
            self._notify_finished()
        return changed
