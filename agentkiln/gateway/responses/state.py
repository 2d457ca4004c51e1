"""Responses API conversation state: stored responses, `previous_response_id`, retrieve/delete/input items.

Where they live: in the store (`Store.put_response` / `get_response`, a `StoredResponse` record each),
so a stored conversation survives a server restart and any replica on one database continues it.
No copy is kept in this process: a record deleted on one replica is gone on all at once. A stored
call pays one insert before it answers; a `store: false` call writes nothing.

Bounds: `max_age_s` since creation (OpenAI keeps 30 days; an agent's conversation needs minutes),
enforced on every read, and `max_bytes` of JSON over all records (the oldest go first). A purge
deletes what is past either bound: started by a stored call at most every `purge_interval_s`, in
the background, in batches of `purge_batch` records (bounded work per store call). An expired,
evicted, deleted, `store: false` or unknown id answers 404 in OpenAI's error shape, as does one
another attempt stored (for an attempt token).

Each record keeps its own input items (what `GET .../input_items` lists, as OpenAI does) and the
whole conversation up to and including its output (input items of every earlier turn, their
output items, function calls and their outputs), which a `previous_response_id` request continues.
Instructions are not carried over (as in OpenAI: each request sends its own). Stored conversations
are kept as sent (a production session's spans are redacted; continuing a conversation needs its text).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from agentkiln.gateway.call import Serving
from agentkiln.gateway.errors import GatewayError, invalid, store_missing
from agentkiln.gateway.incoming import path_agent
from agentkiln.models import StoredResponse
from agentkiln.protocol import Role, principal_of
from agentkiln.store.base import NotFoundError, Store, ValidationError

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64_000_000
DEFAULT_MAX_AGE_S = 24 * 3600.0
PURGE_INTERVAL_S = 10.0
PURGE_BATCH = 1_000
MAX_LIST_LIMIT = 100

Owner = tuple[Optional[str], Optional[str]]  # (rollout_id, attempt_id) a response was recorded on


def not_found(response_id: str, param: str = "response_id") -> GatewayError:
    return GatewayError(
        404,
        f"Response with id '{response_id[:200]}' not found (unknown, deleted, expired, or created with store: false)",
        type="invalid_request_error",
        param=param,
        code="response_not_found",
    )


def record_size(response: dict[str, Any], input_items: list[Any], conversation: list[Any]) -> int:
    return sum(len(json.dumps(x, separators=(",", ":"))) for x in (response, input_items, conversation))


class ResponseStates:
    """Stored responses in the store, under an age and a byte bound (see the module docstring)."""

    def __init__(
        self,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        *,
        purge_interval_s: float = PURGE_INTERVAL_S,
        purge_batch: int = PURGE_BATCH,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.purge_interval_s = purge_interval_s
        self.purge_batch = purge_batch
        self._last_purge = float("-inf")  # the first stored call of a (restarted) server purges
        self._purging: Optional[asyncio.Task[int]] = None

    async def put(
        self,
        store: Optional[Store],
        response: dict[str, Any],
        input_items: list[dict[str, Any]],
        conversation: list[dict[str, Any]],
        owner: Owner = (None, None),
    ) -> None:
        """Store one response (the caller's answer goes out either way: a failed write is logged)."""
        size = record_size(response, input_items, conversation)
        if store is None or size > self.max_bytes:  # no store, or larger than the whole bound: kept nowhere
            return
        record = StoredResponse(
            response_id=response["id"],
            response=response,
            input_items=input_items,
            conversation=conversation,
            rollout_id=owner[0],
            attempt_id=owner[1],
            created_at=time.time(),
            size=size,
        )
        try:
            await store.put_response(record)
        except Exception:
            log.exception("gateway: storing response %s failed (a later lookup answers 404)", record.response_id)
        self._maybe_purge(store)

    async def get(
        self, store: Optional[Store], response_id: str, owner: Optional[Owner] = None, param: str = "response_id"
    ) -> StoredResponse:
        """The record (404 naming `param` if absent, expired, or `owner` is given and differs)."""
        if store is None:
            raise store_missing()
        try:
            rec = await store.get_response(response_id)
        # ValidationError: an id no record can have (a NUL on PostgreSQL, over 512 characters through HttpStore).
        except (NotFoundError, ValidationError):
            raise not_found(response_id, param) from None
        if time.time() - rec.created_at > self.max_age_s:  # the next purge deletes it
            raise not_found(response_id, param)
        if owner is not None and (rec.rollout_id, rec.attempt_id) != owner:
            raise not_found(response_id, param)
        return rec

    async def delete(self, store: Optional[Store], response_id: str, owner: Optional[Owner] = None) -> None:
        await self.get(store, response_id, owner)
        try:
            await store.delete_response(response_id)  # type: ignore[union-attr]
        except NotFoundError:  # deleted meanwhile (another replica, a purge)
            raise not_found(response_id) from None

    async def purge(self, store: Store) -> int:
        """Apply both bounds now, batch after batch; returns how many records went."""
        total = 0
        while True:
            before = time.time() - self.max_age_s
            n = await store.purge_responses(before=before, max_bytes=self.max_bytes, limit=self.purge_batch)
            total += n
            if n < self.purge_batch:
                return total

    def _maybe_purge(self, store: Store) -> None:
        now = time.monotonic()
        if now - self._last_purge < self.purge_interval_s or (self._purging is not None and not self._purging.done()):
            return
        self._last_purge = now
        self._purging = asyncio.create_task(self._purge_logged(store), name="kiln-responses-purge")

    async def _purge_logged(self, store: Store) -> int:
        try:
            purged = await self.purge(store)
        except Exception:
            log.exception("gateway: purging stored responses failed")
            return 0
        if purged:
            log.info("gateway: purged %d stored response(s) past their age or byte bound", purged)
        return purged


def caller_owner(request: Request) -> Optional[Owner]:
    """An attempt token sees only its own attempt's responses; other callers see any (ids are unguessable)."""
    caller = principal_of(request)
    if caller.role == Role.attempt:
        return (caller.rollout_id, caller.attempt_id)
    return None


def with_ids(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as OpenAI lists them: each with an id, a message's text content as parts."""
    out = []
    for item in items:
        item = dict(item)
        kind = item.get("type", "message")
        if kind == "message":
            item["type"] = "message"
            if isinstance(item.get("content"), str):
                part = "output_text" if item.get("role") == "assistant" else "input_text"
                item["content"] = [{"type": part, "text": item["content"]}]
            item.setdefault("status", "completed")
        prefix = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}.get(kind, "item")
        item.setdefault("id", f"{prefix}_{uuid.uuid4().hex[:24]}")
        out.append(item)
    return out


def request_items(raw_input: Any) -> list[dict[str, Any]]:
    """A request's `input` as items (a string is one user message)."""
    if isinstance(raw_input, str):
        return [{"type": "message", "role": "user", "content": raw_input}]
    return list(raw_input)


class ResponseLookup(Serving):
    """`GET|DELETE {prefix}/responses/{response_id}` and `GET {prefix}/responses/{response_id}/input_items`."""

    def __init__(self, deps: Any, states: ResponseStates, *, items: bool = False) -> None:
        super().__init__(deps)
        self.states = states
        self.items = items

    async def __call__(self, request: Request) -> Response:
        path_agent(request)
        rid = request.path_params["response_id"]
        owner = caller_owner(request)
        store = self.deps.get_store(request)
        if request.method == "DELETE":
            await self.states.delete(store, rid, owner)
            return JSONResponse({"id": rid, "object": "response.deleted", "deleted": True})
        rec = await self.states.get(store, rid, owner)
        if not self.items:
            return JSONResponse(rec.response)
        return JSONResponse(_page(rec.input_items, request.query_params))


def _page(items: list[dict[str, Any]], query: Any) -> dict[str, Any]:
    """One cursor page of input items (`order` desc by default, `after` an item id, `limit` 1..100)."""
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid("'order' must be 'asc' or 'desc'", "order")
    try:
        limit = int(query.get("limit", 20))
    except ValueError:
        raise invalid("'limit' must be an integer", "limit") from None
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise invalid(f"'limit' must be between 1 and {MAX_LIST_LIMIT}", "limit")
    seq = items if order == "asc" else items[::-1]
    after = query.get("after")
    if after:
        ids = [it["id"] for it in seq]
        if after not in ids:
            raise invalid(f"No input item with id '{after[:200]}'", "after")
        seq = seq[ids.index(after) + 1 :]
    data = seq[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(seq) > limit,
    }
