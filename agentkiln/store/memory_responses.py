"""The in-memory store's Responses API records (gateway/responses/state.py keeps its conversations here).

A mixin of `InMemoryStore`. The records are immutable and every statement here runs without an
await, so they need no lock; records are copied in and out, as everything the store hands out.
"""

from __future__ import annotations

from agentkiln.models import StoredResponse
from agentkiln.store.base import NotFoundError, ValidationError


def doomed_responses(records: list[StoredResponse], *, before: float, max_bytes: int, limit: int) -> list[str]:
    """Ids the bounds delete, oldest first: created before `before`, or past `max_bytes` counted from
    the newest (the rule the SQL backends state as a window sum)."""
    if limit < 1 or max_bytes < 0:
        raise ValidationError(f"limit must be >= 1 and max_bytes >= 0 (got limit={limit}, max_bytes={max_bytes})")
    total = 0
    doomed = []
    for rec in sorted(records, key=lambda r: (r.created_at, r.response_id), reverse=True):
        total += rec.size
        if rec.created_at < before or total > max_bytes:
            doomed.append(rec.response_id)
    return doomed[::-1][:limit]


class MemoryResponses:
    """Stored responses in a dict (see base.Store for the contract)."""

    _responses: dict[str, StoredResponse]

    async def put_response(self, record: StoredResponse) -> None:
        self._responses[record.response_id] = record.model_copy(deep=True)

    async def get_response(self, response_id: str) -> StoredResponse:
        rec = self._responses.get(response_id)
        if rec is None:
            raise NotFoundError(f"response {response_id} not found")
        return rec.model_copy(deep=True)

    async def delete_response(self, response_id: str) -> None:
        if self._responses.pop(response_id, None) is None:
            raise NotFoundError(f"response {response_id} not found")

    async def purge_responses(self, *, before: float, max_bytes: int, limit: int = 1_000) -> int:
        ids = doomed_responses(list(self._responses.values()), before=before, max_bytes=max_bytes, limit=limit)
        for rid in ids:
            del self._responses[rid]
        return len(ids)
