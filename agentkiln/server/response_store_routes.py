"""Stored Responses API records over /api/v1, so a gateway whose store is an `HttpStore`
(`kiln serve --store http://...`) keeps its conversations in the serving store too.

- `POST /api/v1/stored-responses`: store a `StoredResponse` (one of the same id is replaced).
- `GET /api/v1/stored-responses/{response_id}`: the record (404 when absent).
- `DELETE /api/v1/stored-responses/{response_id}` (404 when absent).
- `POST /api/v1/purge-stored-responses`: apply the age and byte bounds, at most `limit` records.

The admin key only (server/auth.py): the records hold whole conversations of every attempt. Agents
reach their own through the gateway (`/v1/responses/{id}`), which checks the owner.
"""

from __future__ import annotations

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, ConfigDict, Field

from agentkiln.models import MAX_NAME_LENGTH, MAX_RECORD_BYTES, Integer, Number, StoredResponse
from agentkiln.protocol import API_PREFIX
from agentkiln.server.errors import error_responses
from agentkiln.server.json_body import JsonBodyRoute
from agentkiln.store.base import Store

STORED_RESPONSES = "/stored-responses"
PURGE_STORED_RESPONSES = "/purge-stored-responses"

_ANY = error_responses(400, 401, 403, 422, 503)
_BODY = error_responses(413, 415)
_ID = error_responses(404)

router = APIRouter(prefix=API_PREFIX, route_class=JsonBodyRoute, responses=_ANY, tags=["responses"])
_ResponseId = Path(min_length=1, max_length=MAX_NAME_LENGTH)


class PurgeResponsesBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    before: Number = Field(description="delete records created before this time (unix seconds)")
    max_bytes: Integer = Field(
        ge=0, le=MAX_RECORD_BYTES, description="then the oldest while all records together exceed this size"
    )
    limit: Integer = Field(default=1_000, ge=1, le=100_000, description="at most this many records per call")


class PurgedResponses(BaseModel):
    purged: int


class ResponseDone(BaseModel):
    """The answer to a put or a delete (JSON, as every store route answers)."""

    response_id: str


def _store(request: Request) -> Store:
    return request.app.state.store


@router.post(STORED_RESPONSES, response_model=ResponseDone, responses=_BODY)
async def put_response(request: Request, body: StoredResponse) -> ResponseDone:
    await _store(request).put_response(body)
    return ResponseDone(response_id=body.response_id)


@router.get(f"{STORED_RESPONSES}/{{response_id}}", response_model=StoredResponse, responses=_ID)
async def get_response(request: Request, response_id: str = _ResponseId) -> StoredResponse:
    return await _store(request).get_response(response_id)


@router.delete(f"{STORED_RESPONSES}/{{response_id}}", response_model=ResponseDone, responses=_ID)
async def delete_response(request: Request, response_id: str = _ResponseId) -> ResponseDone:
    await _store(request).delete_response(response_id)
    return ResponseDone(response_id=response_id)


@router.post(PURGE_STORED_RESPONSES, response_model=PurgedResponses, responses=_BODY)
async def purge_responses(request: Request, body: PurgeResponsesBody) -> PurgedResponses:
    purged = await _store(request).purge_responses(before=body.before, max_bytes=body.max_bytes, limit=body.limit)
    return PurgedResponses(purged=purged)
