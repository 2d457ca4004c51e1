"""The canary records over /api/v1/canaries: thin routes over the Store's canary methods.

- `POST /api/v1/canaries` (201, body CanaryIn): start one (409 while another is active).
- `GET /api/v1/canaries?limit=&offset=`: newest first.
- `GET /api/v1/canaries/active`: the active canary, null when none runs.
- `GET /api/v1/canaries/{canary_id}`.
- `POST /api/v1/canaries/{canary_id}/decisions` (body {"decision": CanaryDecision,
  "promoted_resources_id": ...}): record the end, 409 once it is decided (one decider wins).

Promoting (publishing the candidate as the deployed version) and the rule that decides live in
agentkiln/production; their action routes sit next to these. Writes are admin-only (server/auth.py).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from agentkiln.models import MAX_NAME_LENGTH, MAX_OFFSET, Canary, CanaryDecision, CanaryIn
from agentkiln.production.canary import with_promoted
from agentkiln.protocol import API_PREFIX, CANARIES_PATH
from agentkiln.server.errors import error_responses
from agentkiln.server.json_body import JsonBodyRoute
from agentkiln.store.base import Store

MAX_PAGE = 10_000
_PATH = CANARIES_PATH[len(API_PREFIX) :]

router = APIRouter(
    prefix=API_PREFIX, route_class=JsonBodyRoute, responses=error_responses(400, 401, 403, 422, 503), tags=["canary"]
)


class EndDecision(CanaryDecision):
    """A decision that ends a canary ("start" is recorded by starting one)."""

    action: Literal["promote", "rollback"]  # type: ignore[assignment]


class DecisionBody(BaseModel):
    # promoted_resources_id goes with a promotion only (production_rules.decide_canary refuses it otherwise).
    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [
        {"properties": {"decision": {"properties": {"action": {"const": "promote"}}}}},
        {"properties": {"decision": {"properties": {"action": {"const": "rollback"}}},
                        "promoted_resources_id": {"type": "null"}}},
    ]})  # fmt: skip

    decision: EndDecision
    promoted_resources_id: str | None = Field(
        default=None, max_length=MAX_NAME_LENGTH, description="with a promotion: the deployed version it published"
    )


def _store(request: Request) -> Store:
    return request.app.state.store


@router.post(_PATH, status_code=201, response_model=Canary, responses=error_responses(404, 409, 413, 415))
async def start_canary(request: Request, body: CanaryIn) -> Canary:
    return await _store(request).start_canary(body)


@router.get(_PATH, response_model=list[Canary])
async def query_canaries(
    request: Request,
    limit: int = Query(default=100, ge=0, le=MAX_PAGE),
    offset: int = Query(default=0, ge=0, le=MAX_OFFSET),
) -> list[Canary]:
    store = _store(request)
    return [await with_promoted(store, c) for c in await store.query_canaries(limit=limit, offset=offset)]


@router.get(_PATH + "/active", response_model=Canary | None)
async def get_active_canary(request: Request) -> Any:
    """The active canary, or null when none runs (as /resources/latest answers)."""
    return await _store(request).get_active_canary()  # active: never promoted yet


@router.get(_PATH + "/{canary_id}", response_model=Canary, responses=error_responses(404))
async def get_canary(request: Request, canary_id: str) -> Canary:
    """A promoted canary names the deployed copy its promotion published (`promoted_resources_id`)."""
    store = _store(request)
    return await with_promoted(store, await store.get_canary(canary_id))


@router.post(_PATH + "/{canary_id}/decisions", response_model=Canary, responses=error_responses(404, 409, 413, 415))
async def decide_canary(request: Request, canary_id: str, body: DecisionBody) -> Canary:
    decision = CanaryDecision.model_validate(body.decision.model_dump())
    return await _store(request).decide_canary(canary_id, decision, promoted_resources_id=body.promoted_resources_id)
