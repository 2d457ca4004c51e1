"""One LLM call through the gateway, whichever OpenAI API it came in by.

`GatewayCall` is the flow both APIs share: find the engine and the attempt the call is recorded
on (one store read), call the engine (whole or streamed), write the call's spans, and turn an
engine failure into an error span plus the HTTP error the client gets. Spans are written before
the answer (or the stream's last event) goes out, so a client that got its answer can
immediately find the span in the store.

A client that goes away while the engine works cancels the work: the engine call (a whole answer,
or a stream's first delta) races the connection's `http.disconnect`, and the engine drops a
cancelled sequence and its KV at its next step. Once a stream is live, Starlette cancels it on
disconnect and `deltas` closes the engine stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, NoReturn, Optional, Protocol, TypeVar

from starlette.requests import Request

from agentkiln.engine.base import ChatRequest, ChatResult, Engine, StreamDelta
from agentkiln.gateway.errors import GatewayError, engine_error, invalid, store_missing
from agentkiln.gateway.incoming import path_agent
from agentkiln.gateway.production import production_session, redact_spans, remember_answer
from agentkiln.gateway.recording import CallContext, resolve_agent_name, span_for_error, spans_for_result
from agentkiln.models import SpanIn
from agentkiln.protocol import Headers, Role, principal_of
from agentkiln.store.base import NotFoundError, Store, StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")
StoreGetter = Callable[[Request], Optional[Store]]
EngineGetter = Callable[[Request], Optional[Engine]]


@dataclass(frozen=True)
class GatewayDeps:
    """What the handlers read per request (so the server can attach or swap the engine at runtime)."""

    get_store: StoreGetter
    get_engine: EngineGetter
    default_max_tokens: Optional[int] = None  # when a client sends no limit (None: app.state, else unbounded)


class Serving:
    """Base of the API handlers (`__call__(request) -> Response`), which share their dependencies."""

    def __init__(self, deps: GatewayDeps) -> None:
        self.deps = deps

    def default_max_tokens(self, request: Request) -> Optional[int]:
        """The limit for a client that sends none: the router's, else the server's
        (`app.state.max_tokens_default`, `kiln serve --max-tokens-default`), else None: until a
        stop or the context limit, so `length` is only ever reported for a limit really hit."""
        if self.deps.default_max_tokens is not None:
            return self.deps.default_max_tokens
        return getattr(request.app.state, "max_tokens_default", None)


class ClientBody(Protocol):
    """The request fields every API has that the call flow reads (both request models have them)."""

    stream: Optional[bool]
    metadata: Optional[dict[str, Any]]
    user: Optional[str]


def require_engine(request: Request, deps: GatewayDeps) -> Engine:
    engine = deps.get_engine(request)
    if engine is None:
        raise GatewayError(
            503,
            "No inference engine is attached to this server (start it with an engine, e.g. `--engine tiny`)",
            type="server_error",
            code="engine_missing",
        )
    return engine


@dataclass(frozen=True)
class Target:
    """Where a call's spans go (None ids: not recorded)."""

    store: Optional[Store] = None
    rollout_id: Optional[str] = None
    attempt_id: Optional[str] = None

    @property
    def recorded(self) -> bool:
        return self.store is not None and self.rollout_id is not None and self.attempt_id is not None


_UNRECORDED = Target()


async def resolve_target(request: Request, get_store: StoreGetter) -> Target:
    """The running attempt named by the path or the X-Kiln-* headers (404 unknown, 409 finished)."""
    rid = request.path_params.get("rollout_id") or request.headers.get(Headers.rollout_id)
    aid = request.path_params.get("attempt_id") or request.headers.get(Headers.attempt_id)
    caller = principal_of(request)
    if caller.role == Role.attempt:  # an attempt token's calls are recorded on its attempt, and only there
        if (rid, aid) not in ((None, None), (caller.rollout_id, caller.attempt_id)):
            raise GatewayError(
                403, "This token records calls only on its own attempt", type="permission_error", code="wrong_attempt"
            )
        rid, aid = caller.rollout_id, caller.attempt_id
    if rid is None and aid is None:
        return _UNRECORDED
    if not rid or not aid:
        raise invalid(f"Both {Headers.rollout_id} and {Headers.attempt_id} are needed to record a call")
    store = get_store(request)
    if store is None:
        raise store_missing()
    if caller.role == Role.attempt:  # the auth middleware has just read this attempt's status: running
        return Target(store, rid, aid)
    try:  # one cheap store read on this hot path: it also tells an unknown rollout
        statuses = await store.attempt_statuses(rid)
    except NotFoundError:
        raise GatewayError(
            404, f"Rollout '{rid}' not found", type="not_found_error", code="rollout_not_found"
        ) from None
    status = statuses.get(aid)
    if status is None:
        raise GatewayError(
            404, f"Attempt '{aid}' of rollout '{rid}' not found", type="not_found_error", code="attempt_not_found"
        )
    if status.finished:
        raise GatewayError(
            409,
            f"Attempt '{aid}' of rollout '{rid}' is already {status.value}; its calls are no longer recorded",
            type="invalid_request_error",
            code="attempt_finished",
        )
    return Target(store, rid, aid)


def client_gone() -> GatewayError:
    """What a call answers once its client has disconnected (nobody reads it; 499 as in nginx logs)."""
    return GatewayError(499, "Client closed the request", type="invalid_request_error", code="client_disconnected")


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away (the body is read, so only `http.disconnect` should come).

    A server that cannot report it (receive fails, or keeps sending other messages) is never
    taken for a disconnect: the watch just waits until it is cancelled.
    """
    try:
        for _ in range(3):
            if (await request.receive())["type"] == "http.disconnect":
                return
    except Exception:
        log.debug("gateway: cannot watch the connection for a disconnect", exc_info=True)
    await asyncio.Event().wait()


async def unless_disconnected(request: Optional[Request], work: Awaitable[T]) -> T:
    """`await work`, or cancel it and raise `client_gone()` if the client disconnects first."""
    if request is None:
        return await work
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            await task  # the engine cancels its sequences on the way out
        log.info("gateway: client disconnected; engine work cancelled")
        raise client_gone()
    return task.result()


class GatewayCall:
    """One call: the engine, where it is recorded, and what is known before the engine answers."""

    __slots__ = ("engine", "target", "ctx", "request", "_first", "_stream")

    def __init__(self, engine: Engine, target: Target, ctx: CallContext, request: Optional[Request] = None) -> None:
        self.engine = engine
        self.target = target
        self.ctx = ctx
        self.request = request  # watched for a disconnect while the engine works
        self._first: Optional[StreamDelta] = None
        self._stream: Optional[AsyncGenerator[StreamDelta, None]] = None

    @classmethod
    async def start(
        cls,
        request: Request,
        deps: GatewayDeps,
        body: ClientBody,
        engine_request: ChatRequest,
        *,
        api: str,
        call_id: str,
    ) -> GatewayCall:
        """Checks the engine and the attempt, and names the calling agent (the engine serves its weights)."""
        engine = require_engine(request, deps)
        agent_in_path = path_agent(request)  # a bad name is rejected before the store is read
        target = await resolve_target(request, deps.get_store)
        agent = resolve_agent_name(
            request.headers,
            body.metadata,
            body.user,
            engine_request.messages,
            path_agent=agent_in_path,
            agent_names=getattr(request.app.state, "agent_names", None),  # `create_app(agent_names=...)`
        )
        engine_request.agent = agent
        session = None
        if target.rollout_id is None:  # plain /v1: a deployed agent's call, maybe recorded on its session
            session = await production_session(request, deps, body, engine_request)
            if session is not None and session.recorded:
                target = Target(deps.get_store(request), session.rollout_id, session.attempt_id)
        ctx = CallContext(
            rollout_id=target.rollout_id or "",
            attempt_id=target.attempt_id or "",
            api=api,
            call_id=call_id,
            agent_name=agent,
            engine_request=engine_request,
            start_time=time.time(),
            stream=bool(body.stream),
            session_id=session.session_id if session is not None else None,
            canary_id=session.canary_id if session is not None else None,
            candidate_versions=session.candidate_versions if session is not None else frozenset(),
        )
        return cls(engine, target, ctx, request)

    @property
    def model(self) -> str:
        """The model name the client asked for (clients check it), else the engine's."""
        return self.ctx.engine_request.model or self.engine.model_name

    def token_text(self, token_id: int) -> str:
        return self.engine.token_text(token_id)

    # ------------------------------------------------------------------ engine

    async def chat(self) -> ChatResult:
        """The whole answer; an engine failure is recorded and raised as the client's GatewayError."""
        try:
            result = await unless_disconnected(self.request, self.engine.chat(self.ctx.engine_request))
        except GatewayError:
            raise
        except Exception as exc:
            await self._fail(exc)
        if not result.choices:
            await self._fail(RuntimeError("engine returned no choices"))
        return self._echo_model(result)

    async def open_stream(self) -> bool:
        """Start the engine stream and wait for its first delta, so early failures get a JSON error status.

        True when that delta already holds the final result (the whole answer is ready).
        """
        self._stream = self.engine.chat_stream(self.ctx.engine_request)  # type: ignore[assignment]
        try:
            self._first = await unless_disconnected(self.request, self._stream.__anext__())
        except GatewayError:
            await self._close_stream()
            raise
        except StopAsyncIteration:
            await self._fail(RuntimeError("engine stream ended without output"))
        except Exception as exc:
            await self._fail(exc)
        return self._first.final is not None

    async def deltas(self) -> AsyncIterator[tuple[str, Optional[ChatResult]]]:
        """(text, None) per delta of the open stream, then (text, final result); a failure is recorded and raised."""
        agen, delta = self._stream, self._first
        assert agen is not None and delta is not None, "open_stream first"
        self._first = self._stream = None
        try:
            while True:
                if delta.final is not None:
                    yield delta.text, self._echo_model(delta.final)
                    return
                if delta.text:
                    yield delta.text, None
                delta = await agen.__anext__()
        except StopAsyncIteration:
            exc: BaseException = RuntimeError("engine stream ended without a final result")
        except Exception as e:  # engine failed mid-stream
            exc = e
        finally:
            await _aclose(agen)
        await self._fail(exc)

    async def _close_stream(self) -> None:
        agen, self._stream, self._first = self._stream, None, None
        if agen is not None:
            await _aclose(agen)

    def _echo_model(self, result: ChatResult) -> ChatResult:
        """Answer under the model name the client asked for; spans keep the real version."""
        model = self.ctx.engine_request.model
        if model and model != result.model:
            return result.model_copy(update={"model": model})
        return result

    # ------------------------------------------------------------------ recording

    async def record(self, result: ChatResult, response_for_choice: Callable[[int], dict[str, Any]]) -> None:
        """One span per choice; `response_for_choice(i)` is the OpenAI body limited to choice i."""
        if self.ctx.session_id is not None and self.request is not None:
            remember_answer(self.request, self.ctx, result)
        if self.target.recorded:
            await self._store(spans_for_result(self.ctx, result, time.time(), response_for_choice))

    async def _fail(self, exc: BaseException) -> NoReturn:
        err = engine_error(exc)
        # The client's fault (e.g. a prompt over the context) needs no stack in the server log.
        log.warning(
            "gateway: engine failed (%s): %s", self.ctx.api, exc, exc_info=exc if err.status_code >= 500 else None
        )
        if self.target.recorded:
            try:
                version: Optional[str] = self.engine.version_for(self.ctx.agent_name)
            except Exception:  # the error span matters more than its version
                version = None
            await self._store([span_for_error(self.ctx, exc, time.time(), version)])
        raise err from exc

    async def _store(self, spans: list[SpanIn]) -> None:
        target = self.target
        if self.ctx.session_id is not None and self.request is not None:
            spans = redact_spans(self.request, spans)
        try:
            await target.store.add_spans(spans)  # type: ignore[union-attr]
        except StoreError as exc:  # e.g. the attempt finished while the engine was generating
            log.warning("gateway: span for %s/%s not stored: %s", target.rollout_id, target.attempt_id, exc)
        except Exception:
            log.exception("gateway: storing span for %s/%s failed", target.rollout_id, target.attempt_id)


async def _aclose(agen: AsyncGenerator[Any, None]) -> None:
    try:
        await agen.aclose()
    except Exception:
        log.debug("gateway: closing engine stream failed", exc_info=True)
