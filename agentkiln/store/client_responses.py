"""`HttpStore`'s stored Responses API records over /api/v1 (routes: server/response_store_routes.py).

A mixin of `HttpStore`: its `_request` retries and sends an Idempotency-Key, and a put replaces
the same immutable record, so a retried put or purge is harmless.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from agentkiln.models import StoredResponse

_RECORDS = "/stored-responses"
_PURGE = "/purge-stored-responses"


def _path(response_id: str) -> str:
    return f"{_RECORDS}/{quote(response_id, safe='')}"


class HttpResponses:
    """Stored responses through the server (see base.Store for the contract)."""

    _request: Callable[..., Awaitable[Any]]

    async def put_response(self, record: StoredResponse) -> None:
        await self._request("POST", _RECORDS, json=record.model_dump(mode="json"))

    async def get_response(self, response_id: str) -> StoredResponse:
        return StoredResponse.model_validate(await self._request("GET", _path(response_id)))

    async def delete_response(self, response_id: str) -> None:
        await self._request("DELETE", _path(response_id))

    async def purge_responses(self, *, before: float, max_bytes: int, limit: int = 1_000) -> int:
        body = {"before": before, "max_bytes": max_bytes, "limit": limit}
        return int((await self._request("POST", _PURGE, json=body))["purged"])
