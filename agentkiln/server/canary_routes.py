"""A person's canary decisions and the evidence: promote, roll back, current statistics.

The records themselves (start, list, read, a raw decision) are the store's routes
(canary_store_routes.py); these routes go through agentkiln/production/canary.py, so a person's
promotion publishes the deployed copy exactly like the rule's, and races it the same way.
All admin-only (server/auth.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Body, Request
from pydantic import BaseModel, ConfigDict, Field

from agentkiln.models import MAX_NAME_LENGTH, Canary
from agentkiln.production import canary as canaries
from agentkiln.protocol import CANARIES_PATH
from agentkiln.server.errors import error_responses
from agentkiln.server.json_body import JsonBodyRoute
from agentkiln.store.base import Store


class DecisionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=100 * MAX_NAME_LENGTH, description="why, recorded with the decision")


_ANY = error_responses(400, 401, 403, 422, 503)
_DECIDE = {**error_responses(404, 409, 413, 415)}


def _store(request: Request) -> Store:
    return request.app.state.store


def build_canary_router() -> APIRouter:
    router = APIRouter(prefix=CANARIES_PATH, route_class=JsonBodyRoute, responses=_ANY)

    @router.post("/{canary_id}/promote", response_model=Canary, responses=_DECIDE)
    async def promote_canary(
        request: Request, canary_id: str, body: DecisionBody = Body(default_factory=DecisionBody)
    ) -> Canary:
        """Deploy the candidate now: publishes a deployed copy of it and ends the canary as promoted.

        404: unknown canary or its candidate resources are gone; 409: the canary is not active
        (decided already, maybe by the rule a moment ago); 422: its candidate is not a candidate version.
        """
        store = _store(request)
        canary = await store.get_canary(canary_id)
        canaries.check_active(canary)
        stats = await canaries.canary_stats(store, canary)
        return await canaries.promote(store, canary, by="user", reason=body.reason, stats=stats)

    @router.post("/{canary_id}/rollback", response_model=Canary, responses=_DECIDE)
    async def rollback_canary(
        request: Request, canary_id: str, body: DecisionBody = Body(default_factory=DecisionBody)
    ) -> Canary:
        """Stop serving the candidate; the baseline keeps serving (404 unknown canary, 409 not active)."""
        store = _store(request)
        canary = await store.get_canary(canary_id)
        canaries.check_active(canary)
        stats = await canaries.canary_stats(store, canary)
        return await canaries.rollback(store, canary, by="user", reason=body.reason, stats=stats)

    @router.get("/{canary_id}/stats", response_model=canaries.CanaryStats, responses=error_responses(404))
    async def canary_stats(request: Request, canary_id: str) -> canaries.CanaryStats:
        """The evidence now: per version the rated sessions and the metric's mean, and the difference's interval."""
        store = _store(request)
        return await canaries.canary_stats(store, await store.get_canary(canary_id))

    return router
