"""JSON REST API over the Store interface, under /api/v1.

One route per Store method, so `HttpStore` is a thin mirror and any language can drive
the queue. Bodies are strict pydantic models (unknown fields are rejected, not ignored:
a typo in a field name must not silently become "no change").
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

from fastapi import APIRouter, Body, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from agentkiln.models import (
    MAX_KEYS,
    MAX_OFFSET,
    Attempt,
    AttemptedRollout,
    AttemptError,
    AttemptStatus,
    Number,
    Resources,
    ResourcesIn,
    Rollout,
    RolloutConfig,
    RolloutMode,
    RolloutStatus,
    Span,
    SpanIn,
    Worker,
    WorkerStatus,
)
from agentkiln.protocol import API_PREFIX, Role, principal_of
from agentkiln.server.auth import check_attempt_holder, check_span_writes
from agentkiln.server.engine_routes import check_publishable
from agentkiln.server.errors import error_responses
from agentkiln.server.json_body import JsonBodyRoute
from agentkiln.store.base import Store

# A long poll holds a connection and a server task; clients loop for longer waits.
MAX_WAIT_S = 30.0
MAX_BATCH = 10_000


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _RolloutFields(_Body):
    """What a client may set on a rollout, when enqueueing it and later."""

    mode: RolloutMode | None = None
    resources_id: str | None = Field(default=None, min_length=1)
    config: RolloutConfig | None = None
    metadata: dict[str, Any] | None = Field(default=None, max_length=MAX_KEYS)


class EnqueueBody(_RolloutFields):
    input: Any = None


class EnqueueBatchBody(_Body):
    items: list[EnqueueBody] = Field(max_length=MAX_BATCH)


class DequeueBody(_Body):
    worker_id: str | None = None


class StartBody(EnqueueBody):
    worker_id: str | None = None


class UpdateRolloutBody(_RolloutFields):
    status: RolloutStatus | None = None


class WaitBody(_Body):
    rollout_ids: list[str] = Field(max_length=MAX_BATCH)
    timeout: Number | None = Field(default=None, ge=0, description=f"capped at {MAX_WAIT_S:g}s per request")


class UpdateAttemptBody(_Body):
    status: AttemptStatus | None = None
    worker_id: str | None = None
    error: AttemptError | None = None


class WorkerHeartbeatBody(_Body):
    status: WorkerStatus | None = None
    current_rollout_id: str | None = None
    current_attempt_id: str | None = None
    metadata: dict[str, Any] | None = Field(default=None, max_length=MAX_KEYS)


class CheckTimeoutsBody(_Body):
    """Empty on purpose: the sweep runs on the server's clock, so a client's `now` is refused (422)."""


class Health(BaseModel):
    status: str = "ok"


def _store(request: Request) -> Store:
    return request.app.state.store


def _set_fields(body: BaseModel) -> dict[str, Any]:
    """Keyword arguments for the store: only what the client sent, as model objects (not dicts)."""
    return {name: getattr(body, name) for name in body.model_fields_set}


def _enqueue_fields(body: EnqueueBody) -> dict[str, Any]:
    """A new rollout's arguments: `input` is always passed (absent in the body = null input)."""
    return {"input": body.input, **_set_fields(body)}


# ?status=a,b: the pattern is the whole check, so the OpenAPI says exactly what is accepted.
_STATUS_NAME = "|".join(s.value for s in RolloutStatus)
_STATUS_PART = f"(?:(?:{_STATUS_NAME}) *)?"
StatusList = Annotated[str, StringConstraints(pattern=f"^ *{_STATUS_PART}(?:, *{_STATUS_PART})*$")]


def _statuses(raw: list[str] | None) -> list[RolloutStatus] | None:
    """Accepts ?status=a&status=b and ?status=a,b (each already matched StatusList)."""
    if not raw:
        return None
    return [RolloutStatus(part.strip()) for item in raw for part in item.split(",") if part.strip()]


# Every status a route can answer is in the OpenAPI, with the error body: what any route may
# answer (auth, a bad query, an overloaded server) once here, the rest per kind of route.
_ANY = error_responses(400, 401, 403, 422, 503)
_BODY = error_responses(413, 415)  # routes that read a JSON body (JsonBodyRoute: 415 for other media)
_ID = error_responses(404)  # routes naming a rollout, attempt or resources id
_BODY_ID = {**_BODY, **_ID}  # writes whose body names ids (resources_id, rollout_ids)
_CHANGE = {**_BODY_ID, **error_responses(409)}  # writes that move a rollout or attempt

router = APIRouter(responses=error_responses(503))
api = APIRouter(prefix=API_PREFIX, route_class=JsonBodyRoute, responses=_ANY)


@router.get("/health", response_model=Health)
async def health() -> Health:
    return Health()


# ----------------------------------------------------------------------------- rollouts


@api.post("/rollouts", response_model=Rollout, responses=_BODY_ID)
async def enqueue_rollout(request: Request, body: EnqueueBody) -> Rollout:
    return await _store(request).enqueue_rollout(**_enqueue_fields(body))


@api.post("/rollouts/batch", response_model=list[Rollout], responses=_BODY_ID)
async def enqueue_rollouts(request: Request, body: EnqueueBatchBody) -> list[Rollout]:
    return await _store(request).enqueue_rollouts([_enqueue_fields(item) for item in body.items])


def _with_token(request: Request, started: AttemptedRollout | None) -> AttemptedRollout | None:
    """The attempt's own credential rides along: the runner hands it (not its key) to the agent."""
    if started is None:
        return None
    token = request.app.state.attempt_tokens.mint(started.rollout.rollout_id, started.attempt.attempt_id)
    return started.model_copy(update={"token": token})


@api.post("/rollouts/start", response_model=AttemptedRollout, responses=_BODY_ID)
async def start_rollout(request: Request, body: StartBody) -> Any:
    return _with_token(request, await _store(request).start_rollout(**_enqueue_fields(body)))


@api.post("/rollouts/wait", response_model=list[Rollout], responses=_BODY_ID)
async def wait_for_rollouts(request: Request, body: WaitBody) -> list[Rollout]:
    timeout = MAX_WAIT_S if body.timeout is None else min(body.timeout, MAX_WAIT_S)
    return await _store(request).wait_for_rollouts(body.rollout_ids, timeout=timeout)


@api.post("/dequeue", response_model=Optional[AttemptedRollout], responses=_BODY)
async def dequeue_rollout(request: Request, body: DequeueBody = Body(default_factory=DequeueBody)) -> Any:
    return _with_token(request, await _store(request).dequeue_rollout(worker_id=body.worker_id))


@api.get("/rollouts", response_model=list[Rollout])
async def query_rollouts(
    request: Request,
    status: list[StatusList] | None = Query(default=None, description="statuses, repeated or comma-separated"),
    mode: RolloutMode | None = None,
    rollout_id: list[str] | None = Query(default=None),
    limit: int = Query(default=100, ge=0, le=MAX_BATCH),
    offset: int = Query(default=0, ge=0, le=MAX_OFFSET),
) -> list[Rollout]:
    return await _store(request).query_rollouts(
        status=_statuses(status), mode=mode, rollout_ids=rollout_id, limit=limit, offset=offset
    )


@api.get("/rollouts/{rollout_id}", response_model=Rollout, responses=_ID)
async def get_rollout(request: Request, rollout_id: str) -> Rollout:
    return await _store(request).get_rollout(rollout_id)


@api.patch("/rollouts/{rollout_id}", response_model=Rollout, responses=_CHANGE)
async def update_rollout(request: Request, rollout_id: str, body: UpdateRolloutBody) -> Rollout:
    return await _store(request).update_rollout(rollout_id, **_set_fields(body))


@api.post("/rollouts/{rollout_id}/cancel", response_model=Rollout, responses=_CHANGE)
async def cancel_rollout(request: Request, rollout_id: str) -> Rollout:
    return await _store(request).cancel_rollout(rollout_id)


# ----------------------------------------------------------------------------- attempts


@api.get("/rollouts/{rollout_id}/attempts", response_model=list[Attempt], responses=_ID)
async def query_attempts(request: Request, rollout_id: str) -> list[Attempt]:
    return await _store(request).query_attempts(rollout_id)


@api.get("/rollouts/{rollout_id}/attempts/latest", response_model=Optional[Attempt], responses=_ID)
async def get_latest_attempt(request: Request, rollout_id: str) -> Any:
    return await _store(request).get_latest_attempt(rollout_id)


@api.patch("/rollouts/{rollout_id}/attempts/{attempt_id}", response_model=Attempt, responses=_CHANGE)
async def update_attempt(request: Request, rollout_id: str, attempt_id: str, body: UpdateAttemptBody) -> Attempt:
    store, caller = _store(request), principal_of(request)
    if caller.role == Role.runner:
        held = next((a for a in await store.query_attempts(rollout_id) if a.attempt_id == attempt_id), None)
        if held is not None:  # an unknown attempt is the store's 404
            check_attempt_holder(caller, held, body.worker_id)
    return await store.update_attempt(rollout_id, attempt_id, **_set_fields(body))


# ----------------------------------------------------------------------------- spans


@api.post("/spans", response_model=list[Span], responses=_CHANGE)
async def add_spans(request: Request, spans: list[SpanIn] = Body(max_length=MAX_BATCH)) -> list[Span]:
    check_span_writes(principal_of(request), spans)
    return await request.app.state.recent_spans.add(_store(request), spans)


@api.get("/rollouts/{rollout_id}/spans", response_model=list[Span], responses=_ID)
async def query_spans(
    request: Request,
    rollout_id: str,
    attempt_id: str | None = None,
    name: str | None = None,
    limit: int = Query(default=10_000, ge=0, le=MAX_BATCH),
    offset: int = Query(default=0, ge=0, le=MAX_OFFSET),
) -> list[Span]:
    return await _store(request).query_spans(rollout_id, attempt_id=attempt_id, name=name, limit=limit, offset=offset)


# ----------------------------------------------------------------------------- resources


@api.post("/resources", response_model=Resources, responses=_BODY)
async def add_resources(request: Request, body: ResourcesIn) -> Resources:
    check_publishable(request.app, body)  # 422 for weights the engine would refuse to load
    return await _store(request).add_resources(body)


@api.get("/resources", response_model=list[Resources])
async def query_resources(
    request: Request,
    limit: int = Query(default=100, ge=0, le=MAX_BATCH),
    offset: int = Query(default=0, ge=0, le=MAX_OFFSET),
) -> list[Resources]:
    return await _store(request).query_resources(limit=limit, offset=offset)


@api.get("/resources/latest", response_model=Optional[Resources])
async def get_latest_resources(request: Request) -> Any:
    return await _store(request).get_latest_resources()


@api.get("/resources/{resources_id}", response_model=Resources, responses=_ID)
async def get_resources(request: Request, resources_id: str) -> Resources:
    return await _store(request).get_resources(resources_id)


# ----------------------------------------------------------------------------- workers & lifecycle


@api.post("/workers/{worker_id}/heartbeat", response_model=Worker, responses=_BODY)
async def heartbeat_worker(
    request: Request, worker_id: str, body: WorkerHeartbeatBody = Body(default_factory=WorkerHeartbeatBody)
) -> Worker:
    return await _store(request).heartbeat_worker(worker_id, **_set_fields(body))


@api.get("/workers", response_model=list[Worker])
async def query_workers(request: Request) -> list[Worker]:
    return await _store(request).query_workers()


@api.post("/check-timeouts", response_model=list[Attempt], responses=_BODY)
async def check_timeouts(
    request: Request, body: CheckTimeoutsBody = Body(default_factory=CheckTimeoutsBody)
) -> list[Attempt]:
    """Run the timeout sweep now, on the server's clock (a client never supplies the time)."""
    return await _store(request).check_timeouts()


router.include_router(api)
