"""The OpenAI-compatible HTTP surface that agents call instead of OpenAI.

Agents keep their code; only the base URL changes. Under `/rollout/{rid}/attempt/{aid}/v1` every
call is recorded as a span of that attempt (the training data); plain `/v1` serves without
recording unless the X-Kiln-Rollout-Id / X-Kiln-Attempt-Id headers name an attempt.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional

from fastapi import APIRouter, FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agentkiln.engine.base import Engine
from agentkiln.gateway.call import EngineGetter, GatewayDeps, StoreGetter
from agentkiln.gateway.chat_completions.serving import ChatCompletionsServing
from agentkiln.gateway.errors import GatewayError
from agentkiln.gateway.models import ModelsServing
from agentkiln.gateway.responses.serving import ResponsesServing
from agentkiln.gateway.responses.state import ResponseLookup, ResponseStates
from agentkiln.protocol import ATTEMPT_AGENT_ROUTE, ATTEMPT_ROUTE, OPENAI_PREFIX
from agentkiln.store.base import Store

Handler = Callable[[Request], Awaitable[Response]]


def _default_store(request: Request) -> Optional[Store]:
    return getattr(request.app.state, "store", None)


def _default_engine(request: Request) -> Optional[Engine]:
    return getattr(request.app.state, "engine", None)


def _answering_errors(handler: Handler) -> Handler:
    """A GatewayError raised anywhere in a handler becomes its OpenAI-shaped JSON answer."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except GatewayError as err:
            return err.response()

    return endpoint


def build_gateway_routes(
    get_store: Optional[StoreGetter] = None,
    get_engine: Optional[EngineGetter] = None,
    *,
    default_max_tokens: Optional[int] = None,
    response_states: Optional[ResponseStates] = None,
) -> list[Route]:
    """/v1/{chat/completions,responses,models} and their per-attempt (and per-agent) twins.

    Plain Starlette routes: the endpoints take the request and answer themselves, so FastAPI's
    dependency solving and route bookkeeping would only add latency to every LLM call.
    The getters are called per request (defaults: `request.app.state.store` / `.engine`), so the
    server can swap or attach the engine at runtime. `default_max_tokens` applies when a client
    sends no limit (None: `app.state.max_tokens_default` if set, else until a stop or the context limit).
    `response_states` holds the bounds of stored Responses API responses, which live in the store
    (default: 64 MB and 24 h; without a store nothing is stored and lookups answer 503).
    """
    deps = GatewayDeps(get_store or _default_store, get_engine or _default_engine, default_max_tokens)
    chat = _answering_errors(ChatCompletionsServing(deps))
    states = response_states if response_states is not None else ResponseStates()
    responses = _answering_errors(ResponsesServing(deps, states))
    stored = _answering_errors(ResponseLookup(deps, states))
    stored_items = _answering_errors(ResponseLookup(deps, states, items=True))
    models = _answering_errors(ModelsServing(deps))
    routes = []
    for prefix in (OPENAI_PREFIX, ATTEMPT_ROUTE, ATTEMPT_AGENT_ROUTE):
        routes.append(Route(f"{prefix}/chat/completions", chat, methods=["POST"]))
        routes.append(Route(f"{prefix}/responses", responses, methods=["POST"]))
        routes.append(Route(f"{prefix}/responses/{{response_id}}", stored, methods=["GET", "DELETE"]))
        routes.append(Route(f"{prefix}/responses/{{response_id}}/input_items", stored_items, methods=["GET"]))
        routes.append(Route(f"{prefix}/models", models, methods=["GET"]))
    return routes


def build_gateway_router(
    get_store: Optional[StoreGetter] = None,
    get_engine: Optional[EngineGetter] = None,
    *,
    default_max_tokens: Optional[int] = None,
    response_states: Optional[ResponseStates] = None,
) -> APIRouter:
    """The gateway routes as a router, for apps that include it next to their own routes."""
    routes = build_gateway_routes(
        get_store, get_engine, default_max_tokens=default_max_tokens, response_states=response_states
    )
    return APIRouter(routes=routes, tags=["gateway"])


def install_gateway(app: FastAPI, **kw: Any) -> None:
    """Put the gateway routes first in `app`: routes are matched in order, and LLM calls are the hot path."""
    app.router.routes[0:0] = build_gateway_routes(**kw)
