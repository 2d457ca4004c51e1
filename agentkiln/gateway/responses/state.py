"""Responses API conversation state: stored responses, `previous_response_id`, retrieve/delete/input items.

Where they live: in this process, in a byte- and age-bounded LRU (`ResponseStates`), not in the
rollout store. A stored response serves the conversation it belongs to: agents chain turns
seconds apart, inside one attempt, so a server restart (which also ends its attempts) loses
nothing a live conversation needs, and rollout data stays the spans alone. Bounds: at most
`max_bytes` of JSON (least recently used first out) and `max_age_s` since creation (OpenAI keeps
30 days; an agent's conversation needs minutes). An evicted, deleted, `store: false` or unknown
id answers 404 in OpenAI's error shape.

Each record keeps its own input items (what `GET .../input_items` lists, as OpenAI does) and the
whole conversation up to and including its output (input items of every earlier turn, their
output items, function calls and their outputs), which a `previous_response_id` request continues.
Instructions are not carried over (as in OpenAI: each request sends its own).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from agentkiln.gateway.call import Serving
from agentkiln.gateway.errors import GatewayError, invalid
from agentkiln.gateway.incoming import path_agent
from agentkiln.protocol import Role, principal_of

DEFAULT_MAX_BYTES = 64_000_000
DEFAULT_MAX_AGE_S = 24 * 3600.0
MAX_LIST_LIMIT = 100


@dataclass
class StoredResponse:
    response: dict[str, Any]
    input_items: list[dict[str, Any]]  # this request's own input, each with an id
    conversation: list[dict[str, Any]]  # every item up to and including this response's output
    owner: tuple[str | None, str | None]  # (rollout_id, attempt_id) it was recorded on, if any
    created: float
    size: int


def not_found(response_id: str, param: str = "response_id") -> GatewayError:
    return GatewayError(
        404,
        f"Response with id '{response_id[:200]}' not found (unknown, deleted, expired, or created with store: false)",
        type="invalid_request_error",
        param=param,
        code="response_not_found",
    )


class ResponseStates:
    """Thread-safe LRU of stored responses, bounded by total JSON bytes and by age."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, max_age_s: float = DEFAULT_MAX_AGE_S) -> None:
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.bytes = 0
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def put(
        self,
        response: dict[str, Any],
        input_items: list[dict[str, Any]],
        conversation: list[dict[str, Any]],
        owner: tuple[str | None, str | None] = (None, None),
    ) -> None:
        size = sum(len(json.dumps(x, separators=(",", ":"))) for x in (response, input_items, conversation))
        rec = StoredResponse(response, input_items, conversation, owner, time.monotonic(), size)
        with self._lock:
            self._drop(response["id"])
            if size > self.max_bytes:
                return  # larger than the whole store: kept nowhere (a later lookup answers 404)
            self._items[response["id"]] = rec
            self.bytes += size
            while self.bytes > self.max_bytes:
                self._drop(next(iter(self._items)))

    def get(
        self, response_id: str, owner: tuple[str | None, str | None] | None = None, param: str = "response_id"
    ) -> StoredResponse:
        """The record (404 naming `param` if absent, expired, or `owner` is given and differs)."""
        with self._lock:
            rec = self._items.get(response_id)
            if rec is not None and time.monotonic() - rec.created > self.max_age_s:
                self._drop(response_id)
                rec = None
            if rec is None or (owner is not None and rec.owner != owner):
                raise not_found(response_id, param)
            self._items.move_to_end(response_id)
            return rec

    def delete(self, response_id: str, owner: tuple[str | None, str | None] | None = None) -> None:
        self.get(response_id, owner)
        with self._lock:
            self._drop(response_id)

    def _drop(self, response_id: str) -> None:
        rec = self._items.pop(response_id, None)
        if rec is not None:
            self.bytes -= rec.size


def caller_owner(request: Request) -> tuple[str | None, str | None] | None:
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
        if request.method == "DELETE":
            self.states.delete(rid, owner)
            return JSONResponse({"id": rid, "object": "response.deleted", "deleted": True})
        rec = self.states.get(rid, owner)
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
