"""How PostgresStore reaches the database: a connection pool, lazy opening, and the NOTIFY listener.

Every write runs in one transaction on a pooled connection and returns only after COMMIT, which
PostgreSQL (synchronous_commit on, its default) acknowledges once the WAL is on disk, so a killed
server loses nothing it answered. A transaction that finishes rollouts also sends their ids on
this schema's channel (`pg_notify`, delivered at commit); one listening connection per store
turns them into wake-ups of its `wait_for_rollouts` callers, whichever replica did the write.

The pool opens on first use (open_store is synchronous), or explicitly with `await store.open()`,
which also applies migrations and so fails fast on a wrong URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from agentkiln.store.base import StoreError, ValidationError
from agentkiln.store.postgres.schema import migrate

log = logging.getLogger(__name__)

T = TypeVar("T")
Conn = AsyncConnection[Any]

OPEN_TIMEOUT_S = 10.0  # opening waits this long for the first connection
LISTEN_RETRY_S = 1.0  # a lost listening connection is re-opened after this pause (waiters poll meanwhile)
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def split_url(url: str) -> tuple[str, str | None]:
    """(libpq URL, schema): `?schema=name` is ours, libpq would refuse it, so it is taken out."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((v for k, v in query if k == "schema"), None)
    if schema is not None and not _SCHEMA_NAME.match(schema):
        raise ValueError(f"schema must be a plain identifier (letters, digits, _), got {schema!r}")
    rest = urlencode([(k, v) for k, v in query if k != "schema"], quote_via=quote)  # libpq reads no '+' as a space
    return urlunsplit(parts._replace(query=rest)), schema


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


class PostgresConnections:
    """The pool, the schema the store lives in, and the listener that wakes local waiters."""

    def __init__(
        self, url: str, *, schema: str | None = None, pool_size: int = 10, open_timeout_s: float = OPEN_TIMEOUT_S
    ) -> None:
        self.url, url_schema = split_url(url)
        self.schema = schema or url_schema
        if self.schema is not None and not _SCHEMA_NAME.match(self.schema):
            raise ValueError(f"schema must be a plain identifier (letters, digits, _), got {self.schema!r}")
        # An answered write is on disk whatever the server's default (durability is the store's
        # contract); options in the URL come after, so a deliberate choice there still wins.
        options = "-c synchronous_commit=on"
        if self.schema is not None:
            options += f" -c search_path={self.schema}"
        options += " " + conninfo_to_dict(self.url).get("options", "")
        self._pool_kwargs: dict[str, Any] = {"autocommit": True, "options": options.strip()}
        self._pool_size = pool_size
        self._pool: AsyncConnectionPool | None = None  # made at open: a pool that failed to open cannot retry
        self._open_timeout_s = open_timeout_s
        self._open_lock = asyncio.Lock()
        self._closed = False
        self.channel = ""  # set on open, from the schema the store lives in
        self._waiters: dict[asyncio.Future[None], frozenset[str]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()

    # ------------------------------------------------------------------ opening and closing

    async def open(self) -> None:
        """Connect and apply migrations now (otherwise the first call does)."""
        await self._ready()

    async def _ready(self) -> AsyncConnectionPool:
        if self._closed:
            raise StoreError("store is closed")
        if self._pool is None:
            async with self._open_lock:
                if self._pool is None:
                    self._pool = await self._open()
        return self._pool

    async def _open(self) -> AsyncConnectionPool:
        """A connected pool on an up-to-date schema; on failure nothing stays open and the next call retries."""
        pool = AsyncConnectionPool(self.url, min_size=1, max_size=self._pool_size, kwargs=self._pool_kwargs, open=False)
        try:
            await pool.open(wait=True, timeout=self._open_timeout_s)
        except Exception as exc:
            await pool.close()
            raise ConnectionError(f"cannot reach PostgreSQL at {redact(self.url)}: {exc}") from exc
        try:
            async with pool.connection() as conn:
                await migrate(conn, self.schema)
                row = await (await conn.execute("SELECT current_schema()")).fetchone()
        except BaseException:
            await pool.close()
            raise
        # NOTIFY reaches the whole database: one channel per schema keeps stores in other schemas out.
        self.channel = "kiln_finished_" + hashlib.sha1(row[0].encode()).hexdigest()[:16]
        return pool

    async def _close_connections(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        if self._pool is not None:
            await self._pool.close()

    # ------------------------------------------------------------------ running work

    async def _write(self, op: Callable[[Conn, list[str]], Awaitable[T]]) -> T:
        """Run `op` in one committed transaction; `op` appends the ids of rollouts it finished."""
        pool = await self._ready()
        finished: list[str] = []
        try:
            # Pipeline mode: statements whose results are not read yet (BEGIN, writes, COMMIT) travel
            # with the next one, so a lone span costs two round trips instead of seven.
            async with pool.connection() as conn, conn.pipeline(), conn.transaction():
                result = await op(conn, finished)
                if finished:
                    await conn.execute(
                        "SELECT pg_notify(%s, id) FROM unnest(%s::text[]) AS id", (self.channel, finished)
                    )
        except psycopg.DataError as exc:
            raise ValidationError(f"PostgreSQL cannot store this value: {exc}") from exc
        for rollout_id in finished:  # our own waiters need not wait for the notification
            self._wake(rollout_id)
        return result

    async def _read(self, op: Callable[[Conn], Awaitable[T]], *, snapshot: bool = False) -> T:
        """Run a read; `snapshot` puts its statements in one transaction so they see one state."""
        pool = await self._ready()
        try:
            async with pool.connection() as conn:
                if not snapshot:
                    return await op(conn)
                async with conn.transaction():
                    return await op(conn)
        except psycopg.DataError as exc:
            raise ValidationError(f"PostgreSQL cannot read with this value: {exc}") from exc

    # ------------------------------------------------------------------ waking waiters

    def _add_waiter(self, rollout_ids: frozenset[str]) -> asyncio.Future[None]:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[waiter] = rollout_ids
        return waiter

    def _remove_waiter(self, waiter: asyncio.Future[None]) -> None:
        self._waiters.pop(waiter, None)

    def _wake(self, rollout_id: str | None) -> None:
        """Wake waiters for this rollout (None: all of them, e.g. after the listener reconnected)."""
        for waiter, ids in list(self._waiters.items()):
            if not waiter.done() and (rollout_id is None or rollout_id in ids):
                waiter.set_result(None)

    async def _ensure_listening(self, within_s: float) -> bool:
        """Start the listener if needed; True once it is listening (finishes after that wake us)."""
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="kiln-postgres-listen")
        if not self._listening.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._listening.wait(), within_s)
        return self._listening.is_set()

    async def _listen(self) -> None:
        while not self._closed:
            try:
                async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    self._listening.set()
                    self._wake(None)  # finishes while nobody listened went unheard: everyone re-reads
                    async for note in conn.notifies():
                        self._wake(note.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: reconnect, waiters poll meanwhile
                log.warning("PostgreSQL listener lost (%s); waiters poll until it is back", exc)
            finally:
                self._listening.clear()
            await asyncio.sleep(LISTEN_RETRY_S)
