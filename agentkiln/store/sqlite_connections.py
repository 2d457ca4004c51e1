"""How SqliteStore's work reaches the file: the database thread, or the caller's own connection.

All writes normally go to one dedicated thread owning one connection (`sqlite_worker`), which
batches concurrent requests into group-commit transactions; a call returns only after its
transaction committed (WAL + synchronous=NORMAL survives a killed process). Small reads, and a
lone small write when the file is free, run on the caller's thread with its own connection
instead: the hop to the database thread and back costs more than the query. Anything that finds
the file busy goes through the thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from agentkiln.store.base import StoreError
from agentkiln.store.sqlite_worker import DbThread, Request

T = TypeVar("T")

READ_BUSY_S = 0.05  # a direct read that finds the file busy this long goes through the database thread
CHECKPOINT_EVERY = 200  # direct commits between WAL checkpoints (about 1 MB of WAL for LLM spans)
_BUSY = object()


class SqliteConnections:
    """The database thread plus per-thread direct connections of one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = DbThread(self.path)
        # A store dropped without close() still releases its thread and connection.
        self._finalizer = weakref.finalize(self, self._db.request_stop)
        self._closed = False
        # "read" / "write" -> (connection, the thread that opened it) for work done on the caller's thread.
        self._direct: dict[str, tuple[sqlite3.Connection, int]] = {}
        self._direct_commits = 0

    def _direct_connection(self, kind: str) -> sqlite3.Connection | None:
        """This thread's own connection of `kind`, opened on first use; None where none can serve.

        One thread per connection: callers on other threads (and in-memory files, which only the
        database thread's connection sees) go through the database thread.
        """
        if self.path == ":memory:" or self._closed:
            return None
        owned = self._direct.get(kind)
        if owned is not None:
            return owned[0] if owned[1] == threading.get_ident() else None
        if kind == "read":
            conn = sqlite3.connect(self.path, timeout=READ_BUSY_S, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA query_only = ON")
        else:  # never waits for the lock; never checkpoints (the database thread does)
            conn = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA wal_autocheckpoint=0")
        self._direct[kind] = (conn, threading.get_ident())
        return conn

    def _read_direct(self, fn: Callable[[sqlite3.Connection], T]) -> T | object:
        """Run a small read in one read transaction on this thread; _BUSY if it cannot (then use _call)."""
        conn = self._direct_connection("read")
        if conn is None:
            return _BUSY
        try:
            conn.execute("BEGIN")
        except sqlite3.OperationalError:
            return _BUSY
        try:
            return fn(conn)
        except sqlite3.OperationalError:
            return _BUSY
        finally:
            conn.execute("COMMIT")

    def _write_direct(self, fn: Callable[[sqlite3.Connection], T]) -> T | object:
        """Run a small write in its own transaction on this thread; _BUSY if the file is locked (then use _call).

        A lone LLM span (the gateway's hot path) then costs one commit and no round trip to the
        database thread. The lock is tried, never waited for: whenever the database thread or
        another process is writing, the caller joins the group commit as before. This
        connection never checkpoints; the database thread does, every CHECKPOINT_EVERY direct commits.
        """
        conn = self._direct_connection("write")
        if conn is None:
            return _BUSY
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return _BUSY
        try:
            value = fn(conn)
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):
                return _BUSY  # e.g. locked at COMMIT: nothing was stored, the database thread retries
            raise
        self._direct_commits += 1
        if self._direct_commits % CHECKPOINT_EVERY == 0:
            self._db.request_checkpoint()
        return value

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        value = self._write_direct(fn)
        return await self._call(fn) if value is _BUSY else value  # type: ignore[return-value]

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        value = self._read_direct(fn)
        return await self._call(fn, write=False) if value is _BUSY else value  # type: ignore[return-value]

    async def _call(self, fn: Callable[[sqlite3.Connection], T], *, write: bool = True) -> T:
        if self._closed:
            raise StoreError("store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._db.submit(Request(fn, write, loop, future))
        return await future

    async def _close_connections(self) -> None:
        self._closed = True
        self._finalizer.detach()
        for conn, _ in self._direct.values():
            conn.close()
        self._direct.clear()
        await asyncio.to_thread(self._db.stop)
