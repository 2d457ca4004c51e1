"""`HttpStore`'s production calls: sessions, feedback, retention and canaries over /api/v1.

A mixin of `HttpStore` (its `_request` retries and sends an Idempotency-Key; the server makes that
key the feedback's client id when none is given, so a retry that reaches a restarted server still
stores one record). Routes: server/feedback_routes.py and server/canary_store_routes.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from pydantic import TypeAdapter

from agentkiln.models import AttemptedRollout, Canary, CanaryDecision, CanaryIn, Feedback, FeedbackIn
from agentkiln.protocol import API_PREFIX, CANARIES_PATH, FEEDBACK_PATH
from agentkiln.store.base import NotFoundError

_FEEDBACK = FEEDBACK_PATH[len(API_PREFIX) :]
_CANARIES = CANARIES_PATH[len(API_PREFIX) :]


def _seg(value: str) -> str:
    return quote(value, safe="")


class HttpProduction:
    """Sessions, feedback and canaries through the server (see base.Store for the contract)."""

    _request: Callable[..., Awaitable[Any]]

    async def open_session(self, session_id: str, *, metadata: dict[str, Any] | None = None) -> AttemptedRollout:
        body: dict[str, Any] = {"session_id": session_id}
        if metadata is not None:
            body["metadata"] = metadata
        return AttemptedRollout.model_validate(await self._request("POST", "/sessions", json=body))

    async def add_feedback(self, feedback: FeedbackIn) -> Feedback:
        body = feedback.model_dump(mode="json", exclude_none=True)
        return Feedback.model_validate(await self._request("POST", _FEEDBACK, json=body))

    async def query_feedback(
        self,
        *,
        session_id: str | None = None,
        rollout_id: str | None = None,
        response_id: str | None = None,
        since: float | None = None,
        limit: int = 1_000,
        offset: int = 0,
    ) -> list[Feedback]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        for key, value in (("session_id", session_id), ("rollout_id", rollout_id), ("response_id", response_id),
                           ("since", since)):  # fmt: skip
            if value is not None:
                params[key] = value
        data = await self._request("GET", _FEEDBACK, params=params)
        return TypeAdapter(list[Feedback]).validate_python(data)

    async def purge_production(self, before: float) -> int:
        data = await self._request("POST", "/purge-production", json={"before": before})
        return int(data["purged"])

    async def start_canary(self, canary: CanaryIn) -> Canary:
        return Canary.model_validate(await self._request("POST", _CANARIES, json=canary.model_dump(mode="json")))

    async def get_canary(self, canary_id: str) -> Canary:
        return Canary.model_validate(await self._request("GET", f"{_CANARIES}/{_seg(canary_id)}"))

    async def get_active_canary(self) -> Canary | None:
        try:
            data = await self._request("GET", f"{_CANARIES}/active")
        except NotFoundError:  # a server that answers 404 when none runs
            return None
        return None if data is None else Canary.model_validate(data)

    async def query_canaries(self, *, limit: int = 100, offset: int = 0) -> list[Canary]:
        data = await self._request("GET", _CANARIES, params={"limit": limit, "offset": offset})
        return TypeAdapter(list[Canary]).validate_python(data)

    async def decide_canary(
        self, canary_id: str, decision: CanaryDecision, *, promoted_resources_id: str | None = None
    ) -> Canary:
        body = {"decision": decision.model_dump(mode="json"), "promoted_resources_id": promoted_resources_id}
        path = f"{_CANARIES}/{_seg(canary_id)}/decisions"
        return Canary.model_validate(await self._request("POST", path, json=body))
