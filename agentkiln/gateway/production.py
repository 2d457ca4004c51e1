"""The gateway's side of learning from use: a plain /v1 call's session, canary arm and redaction.

Reads two things the server keeps on `app.state`: `production` (a ProductionCapture: whether and
how calls are recorded) and `model_sync.serving_canary` (the active canary whose candidate
weights the engine has loaded). A server with capture off and no canary pays one attribute
read per call here.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Optional

from starlette.requests import Request

from agentkiln.engine.base import ChatRequest, ChatResult
from agentkiln.gateway.errors import invalid
from agentkiln.models import SpanIn
from agentkiln.production.assignment import CANDIDATE, serves_candidate
from agentkiln.production.capture import ProductionCapture
from agentkiln.production.sessions import SessionIdError
from agentkiln.protocol import SESSION_ATTEMPT_ID, session_rollout_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionRoute:
    session_id: str
    rollout_id: str
    attempt_id: str = SESSION_ATTEMPT_ID
    recorded: bool = False
    canary_id: Optional[str] = None  # set when the candidate serves this call
    candidate_versions: frozenset[str] = frozenset()  # its weights' version labels (a span names the canary only then)


def _capture(request: Request) -> Optional[ProductionCapture]:
    return getattr(request.app.state, "production", None)


def _sync(request: Request) -> Any:
    return getattr(request.app.state, "model_sync", None)


async def production_session(request: Request, deps: Any, body: Any, engine_request: ChatRequest) -> Optional[SessionRoute]:
    """The session of a plain /v1 call (None when the server neither captures nor runs a canary)."""
    capture, sync = _capture(request), _sync(request)
    canary = getattr(sync, "serving_canary", None)
    if capture is None or (not capture.config.enabled and canary is None):
        return None
    try:
        session_id = capture.session_of(request.headers, body.metadata, body.user, engine_request.messages)
    except SessionIdError as exc:
        raise invalid(str(exc)) from None
    canary_id, versions = None, frozenset()
    if serves_candidate(canary, session_id):
        engine_request.variant = CANDIDATE
        canary_id, versions = canary.canary_id, sync.candidate_versions
    route = SessionRoute(session_id, session_rollout_id(session_id), canary_id=canary_id, candidate_versions=versions)
    store = deps.get_store(request)
    if store is None or not capture.config.enabled:
        return route
    try:
        recorded = await capture.records(store, session_id, request.headers)
    except Exception as exc:  # serving matters more than recording: answer, unrecorded, and say so in the log
        log.warning("production capture: session %s could not be opened (%s); call not recorded", session_id, exc)
        return route
    return dataclasses.replace(route, recorded=recorded)


def remember_answer(request: Request, ctx: Any, result: ChatResult) -> None:
    """Index the answer so the conversation's next call finds its session."""
    capture = _capture(request)
    if capture is not None:
        capture.resolver.remember(ctx.session_id, ctx.engine_request.messages, result)


def redact_spans(request: Request, spans: list[SpanIn]) -> list[SpanIn]:
    """The spans with the server's redaction applied (unchanged without a redactor)."""
    capture = _capture(request)
    redactor = capture.redactor if capture is not None else None
    if redactor is None:
        return spans
    return [span.model_copy(update={"attributes": redactor.attributes(span.attributes)}) for span in spans]


