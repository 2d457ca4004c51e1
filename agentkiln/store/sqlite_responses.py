"""The SQLite store's Responses API records: one row per stored response, the record as JSON.

A mixin of `SqliteStore` on its connections (`sqlite_connections`): a put is one small insert, which
commits before it returns (a killed server keeps it) and usually goes straight to the file. The
bounds are one DELETE (`PURGE_SQL`), shared in spirit with `memory_responses.doomed_responses`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from agentkiln.models import StoredResponse
from agentkiln.store.base import NotFoundError, ValidationError

RESPONSES_TABLE = """CREATE TABLE IF NOT EXISTS responses (
        response_id TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        size INTEGER NOT NULL,  -- what the byte bound counts
        data TEXT NOT NULL  -- JSON: the StoredResponse record
    )"""
RESPONSES_AGE_INDEX = "CREATE INDEX IF NOT EXISTS responses_by_age ON responses(created_at, response_id)"
_PUT = "INSERT OR REPLACE INTO responses (response_id, created_at, size, data) VALUES (?, ?, ?, ?)"
# Too old, or past the byte bound counted from the newest; oldest first, at most ?3 rows.
PURGE_SQL = (
    "DELETE FROM responses WHERE response_id IN (SELECT response_id FROM (SELECT response_id, created_at, "
    "SUM(size) OVER (ORDER BY created_at DESC, response_id DESC) AS newer FROM responses) "
    "WHERE created_at < ?1 OR newer > ?2 ORDER BY created_at, response_id LIMIT ?3)"
)


class SqliteResponses:
    """Stored responses in the SQLite file (see base.Store for the contract)."""

    _write: Callable[..., Any]
    _read: Callable[..., Any]
    _call: Callable[..., Any]

    async def put_response(self, record: StoredResponse) -> None:
        values = (record.response_id, record.created_at, record.size, record.model_dump_json())

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(_PUT, values)

        await self._write(op)

    async def get_response(self, response_id: str) -> StoredResponse:
        def op(conn: sqlite3.Connection) -> Any:
            return conn.execute("SELECT data FROM responses WHERE response_id = ?", (response_id,)).fetchone()

        row = await self._read(op)
        if row is None:
            raise NotFoundError(f"response {response_id} not found")
        return StoredResponse.model_validate_json(row[0])

    async def delete_response(self, response_id: str) -> None:
        def op(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM responses WHERE response_id = ?", (response_id,)).rowcount

        if not await self._write(op):
            raise NotFoundError(f"response {response_id} not found")

    async def purge_responses(self, *, before: float, max_bytes: int, limit: int = 1_000) -> int:
        if limit < 1 or max_bytes < 0:
            raise ValidationError(f"limit must be >= 1 and max_bytes >= 0 (got limit={limit}, max_bytes={max_bytes})")
        return await self._call(lambda conn: conn.execute(PURGE_SQL, (before, max_bytes, limit)).rowcount)
