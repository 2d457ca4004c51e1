"""Feedback and production sessions over /api/v1 (learning from use).

- `POST /api/v1/feedback` (201): a user's judgement of a response, a span or a session; the one
  route a feedback key may call. An `Idempotency-Key` header becomes the record's `client_id`
  when the body names none, so a retry is stored once even after a server restart (the store
  keeps client ids; the middleware's replay memory is per process).
- `GET /api/v1/feedback?session_id=&rollout_id=&response_id=&since=&limit=&offset=`: oldest first.
- `GET /api/v1/sessions/{session_id}`: the session's rollout and its feedback.
- `POST /api/v1/sessions`: open (or find) a session's rollout, as the gateway does on first use.
- `POST /api/v1/purge-production`: retention, deletes sessions idle since `before`.

Who may call which is server/auth.py's route policy.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from agentkiln.models import (
    MAX_KEYS,
    MAX_NAME_LENGTH,
    MAX_OFFSET,
    SESSION_ID_PATTERN,
    AttemptedRollout,
    Feedback,
    FeedbackIn,
    Number,
    Rollout,
)
from agentkiln.protocol import API_PREFIX, FEEDBACK_PATH, Headers, session_rollout_id
from agentkiln.server.errors import error_responses
from agentkiln.server.json_body import JsonBodyRoute
from agentkiln.store.base import Store

MAX_PAGE = 10_000

_ANY = error_responses(400, 401, 403, 422, 503)
_BODY = error_responses(413, 415)
_ID = error_responses(404)

router = APIRouter(prefix=API_PREFIX, route_class=JsonBodyRoute, responses=_ANY, tags=["feedback"])


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SessionBody(_Body):
    session_id: str = Field(pattern=SESSION_ID_PATTERN)
    metadata: dict[str, Any] | None = Field(default=None, max_length=MAX_KEYS)


class SessionView(BaseModel):
    """A production session: its rollout (spans: GET /api/v1/rollouts/{rollout_id}/spans) and its feedback."""

    session_id: str
    rollout: Rollout
    feedback: list[Feedback]


class PurgeBody(_Body):
    before: Number = Field(description="delete production rollouts last active before this time (unix seconds)")


class Purged(BaseModel):
    purged: int = Field(description="how many production rollouts were deleted")


def _store(request: Request) -> Store:
    return request.app.state.store


def _with_client_id(request: Request, feedback: FeedbackIn) -> FeedbackIn:
    """The Idempotency-Key (when the body has no client_id) identifies the post durably."""
    key = request.headers.get(Headers.idempotency_key)
    if feedback.client_id is not None or not key or len(key) > MAX_NAME_LENGTH:
        return feedback
    return feedback.model_copy(update={"client_id": key})


@router.post(FEEDBACK_PATH[len(API_PREFIX) :], status_code=201, response_model=Feedback, responses={**_BODY, **_ID})
async def add_feedback(request: Request, body: FeedbackIn) -> Feedback:
    """Store feedback on a response id, a session id, or a span id with its rollout id (404: no such target)."""
    return await _store(request).add_feedback(_with_client_id(request, body))


@router.get(FEEDBACK_PATH[len(API_PREFIX) :], response_model=list[Feedback])
async def query_feedback(
    request: Request,
    session_id: str | None = Query(default=None, pattern=SESSION_ID_PATTERN),
    rollout_id: str | None = Query(default=None, max_length=MAX_NAME_LENGTH),
    response_id: str | None = Query(default=None, max_length=MAX_NAME_LENGTH),
    since: float | None = Query(default=None, description="created at or after (unix seconds)"),
    limit: int = Query(default=1_000, ge=0, le=MAX_PAGE),
    offset: int = Query(default=0, ge=0, le=MAX_OFFSET),
) -> list[Feedback]:
    return await _store(request).query_feedback(
        session_id=session_id, rollout_id=rollout_id, response_id=response_id, since=since, limit=limit, offset=offset
    )


@router.post("/sessions", response_model=AttemptedRollout, responses=_BODY)
async def open_session(request: Request, body: SessionBody) -> AttemptedRollout:
    """The session's rollout, created on first use, with a token for its attempt (spans, gateway calls)."""
    opened = await _store(request).open_session(body.session_id, metadata=body.metadata)
    token = request.app.state.attempt_tokens.mint(opened.rollout.rollout_id, opened.attempt.attempt_id)
    return opened.model_copy(update={"token": token})


@router.get("/sessions/{session_id}", response_model=SessionView, responses=_ID)
async def get_session(
    request: Request,
    session_id: str = Path(pattern=SESSION_ID_PATTERN),
    limit: int = Query(default=1_000, ge=0, le=MAX_PAGE, description="feedback records at most"),
) -> SessionView:
    store = _store(request)
    rollout = await store.get_rollout(session_rollout_id(session_id))
    feedback = await store.query_feedback(session_id=session_id, limit=limit)
    return SessionView(session_id=session_id, rollout=rollout, feedback=feedback)


@router.post("/purge-production", response_model=Purged, responses=_BODY)
async def purge_production(request: Request, body: PurgeBody) -> Purged:
    return Purged(purged=await _store(request).purge_production(body.before))
