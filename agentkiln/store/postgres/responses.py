"""The PostgreSQL store's Responses API records, which every replica on the database serves.

A mixin of `PostgresStore` on its pool (`connections`); table from schema version 4. A put is one
upsert (a retried put replaces the same immutable record). Replicas may purge at once: each
DELETE takes the rows it finds, a row another purge took is skipped, so the bounds hold either way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from agentkiln.models import StoredResponse
from agentkiln.store.base import NotFoundError, ValidationError
from agentkiln.store.postgres.connections import Conn

_PUT = (
    "INSERT INTO responses (response_id, created_at, size, data) VALUES (%s, %s, %s, %s::json) "
    "ON CONFLICT (response_id) DO UPDATE SET created_at = EXCLUDED.created_at, size = EXCLUDED.size, "
    "data = EXCLUDED.data"
)
# Too old, or past the byte bound counted from the newest; oldest first, at most `limit` rows.
_PURGE = (
    "DELETE FROM responses WHERE response_id IN (SELECT response_id FROM (SELECT response_id, created_at, "
    "SUM(size) OVER (ORDER BY created_at DESC, response_id DESC) AS newer FROM responses) AS r "
    "WHERE created_at < %(before)s OR newer > %(max_bytes)s ORDER BY created_at, response_id LIMIT %(limit)s) "
    "RETURNING 1"
)


class PostgresResponses:
    """Stored responses in the database (see base.Store for the contract)."""

    _write: Callable[[Callable[[Conn, list[str]], Awaitable[Any]]], Awaitable[Any]]
    _read: Callable[..., Awaitable[Any]]

    async def put_response(self, record: StoredResponse) -> None:
        values = (record.response_id, record.created_at, record.size, record.model_dump_json())

        async def op(conn: Conn, finished: list[str]) -> None:
            await conn.execute(_PUT, values)

        await self._write(op)

    async def get_response(self, response_id: str) -> StoredResponse:
        async def op(conn: Conn) -> Any:
            cur = await conn.execute("SELECT data::text FROM responses WHERE response_id = %s", (response_id,))
            return await cur.fetchone()

        row = await self._read(op)
        if row is None:
            raise NotFoundError(f"response {response_id} not found")
        return StoredResponse.model_validate_json(row[0])

    async def delete_response(self, response_id: str) -> None:
        async def op(conn: Conn, finished: list[str]) -> int:
            cur = await conn.execute("DELETE FROM responses WHERE response_id = %s RETURNING 1", (response_id,))
            return len(await cur.fetchall())  # rowcount is not known yet in pipeline mode

        if not await self._write(op):
            raise NotFoundError(f"response {response_id} not found")

    async def purge_responses(self, *, before: float, max_bytes: int, limit: int = 1_000) -> int:
        if limit < 1 or max_bytes < 0:
            raise ValidationError(f"limit must be >= 1 and max_bytes >= 0 (got limit={limit}, max_bytes={max_bytes})")

        async def op(conn: Conn, finished: list[str]) -> int:
            cur = await conn.execute(_PURGE, {"before": before, "max_bytes": max_bytes, "limit": limit})
            return len(await cur.fetchall())

        return await self._write(op)
