"""The thread that owns a SqliteStore's connection and runs its requests in group-commit transactions.

It drains every request waiting in its queue into a single transaction, so a hundred runners
adding spans at once cost one WAL commit, not a hundred. Each write runs inside its own
SAVEPOINT, so one caller's error (unknown id, invalid transition) rolls back only that
caller's work. Writes use BEGIN IMMEDIATE, which takes SQLite's write lock up front: two
processes sharing the file can never dequeue the same rollout. Results reach the
callers' event loops only after COMMIT.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agentkiln.store.sqlite_schema import open_connection

log = logging.getLogger(__name__)

MAX_BATCH = 512  # requests per group-commit transaction
_CHECKPOINT = object()  # queue item: checkpoint the WAL between transactions


@dataclass
class Request:
    fn: Callable[[sqlite3.Connection], Any]
    write: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


def deliver(future: asyncio.Future, value: Any, exc: BaseException | None) -> None:
    """Resolve a future unless its caller gave up or it is already resolved; call on the future's loop.

    `done()`, not `cancelled()`: a future resolved meanwhile (seen once as InvalidStateError in a GEPA
    test's stderr) must not raise on the event loop, where nothing can handle it.
    """
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)


class DbThread:
    """Owns the connection; runs queued requests in group-commit transactions."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._queue: queue.SimpleQueue[Request | object | None] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._open_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"agentkiln-sqlite:{path}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._open_error is not None:
            raise self._open_error

    def submit(self, request: Request) -> None:
        self._queue.put(request)

    def request_checkpoint(self) -> None:
        """Fold the WAL back into the database file soon (PASSIVE: never waits for readers or writers)."""
        self._queue.put(_CHECKPOINT)

    def request_stop(self) -> None:
        """Finish queued work, then close the connection (does not wait)."""
        self._queue.put(None)

    def stop(self) -> None:
        self.request_stop()
        self._thread.join()

    def _run(self) -> None:
        try:
            conn = open_connection(self._path)
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
            if first is _CHECKPOINT:
                self._checkpoint(conn)
                continue
            batch = [first]
            checkpoint = False
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                if nxt is _CHECKPOINT:
                    checkpoint = True
                    continue
                batch.append(nxt)
            self._execute(conn, batch)
            if checkpoint:
                self._checkpoint(conn)
        conn.close()

    @staticmethod
    def _checkpoint(conn: sqlite3.Connection) -> None:
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error:
            log.warning("sqlite checkpoint failed", exc_info=True)

    def _execute(self, conn: sqlite3.Connection, batch: list[Request]) -> None:
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
                r.loop.call_soon_threadsafe(deliver, r.future, value, exc)
            except RuntimeError:  # the caller's loop is gone
                pass

    @staticmethod
    def _one(conn: sqlite3.Connection, r: Request) -> tuple[Any, BaseException | None]:
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
