"""The OpenAI-compatible HTTP surface that agents call instead of OpenAI.

Agents keep their code; only the base URL changes. Under `/rollout/{rid}/attempt/{aid}/v1` every
call is recorded as a span of that attempt (the training data); plain `/v1` serves without
recording unless the X-Kiln-Rollout-Id / X-Kiln-Attempt-Id headers name an attempt.
Spans are written before the answer (or the stream's last event) goes out, so a client that
got its answer can immediately find the span in the store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable, Optional, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.routing import Route

from agentkiln.engine.base import ChatRequest, ChatResult, Engine, StreamDelta
from agentkiln.gateway import openai_schema as oai
from agentkiln.gateway.openai_schema import GatewayError
from agentkiln.gateway.recording import CallContext, resolve_agent_name, span_for_error, spans_for_result
from agentkiln.models import SpanIn
from agentkiln.protocol import ATTEMPT_AGENT_ROUTE, ATTEMPT_ROUTE, OPENAI_PREFIX, Headers, is_valid_agent_name
from agentkiln.store.base import NotFoundError, Store, StoreError

_Body = TypeVar("_Body", bound=BaseModel)

log = logging.getLogger(__name__)

StoreGetter = Callable[[Request], Optional[Store]]
EngineGetter = Callable[[Request], Optional[Engine]]

MAX_BODY_BYTES = 8_000_000
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _default_store(request: Request) -> Optional[Store]:
    return getattr(request.app.state, "store", None)


def _default_engine(request: Request) -> Optional[Engine]:
    return getattr(request.app.state, "engine", None)


def build_gateway_routes(
    get_store: Optional[StoreGetter] = None,
    get_engine: Optional[EngineGetter] = None,
    *,
    default_max_tokens: Optional[int] = None,
) -> list[Route]:
    """/v1/{chat/completions,responses,models} and their per-attempt (and per-agent) twins.

    Plain Starlette routes: the endpoints take the request and answer themselves, so FastAPI's
    dependency solving and route bookkeeping would only add latency to every LLM call.
    The getters are called per request (defaults: `request.app.state.store` / `.engine`), so the
    server can swap or attach the engine at runtime. `default_max_tokens` applies when a client
    sends no limit (None: the engine contract's default, 256).
    """
    gw = _Gateway(get_store or _default_store, get_engine or _default_engine, default_max_tokens)
    routes = []
    for prefix in (OPENAI_PREFIX, ATTEMPT_ROUTE, ATTEMPT_AGENT_ROUTE):
        routes.append(Route(f"{prefix}/chat/completions", gw.chat_completions, methods=["POST"]))
        routes.append(Route(f"{prefix}/responses", gw.responses, methods=["POST"]))
        routes.append(Route(f"{prefix}/models", gw.models, methods=["GET"]))
    return routes


def build_gateway_router(
    get_store: Optional[StoreGetter] = None,
    get_engine: Optional[EngineGetter] = None,
    *,
    default_max_tokens: Optional[int] = None,
) -> APIRouter:
    """The gateway routes as a router, for apps that include it next to their own routes."""
    return APIRouter(
        routes=build_gateway_routes(get_store, get_engine, default_max_tokens=default_max_tokens), tags=["gateway"]
    )


def install_gateway(app: FastAPI, **kw: Any) -> None:
    """Put the gateway routes first in `app`: routes are matched in order, and LLM calls are the hot path."""
    app.router.routes[0:0] = build_gateway_routes(**kw)


# --------------------------------------------------------------------------- helpers


def _error_response(err: GatewayError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status_code)


def _engine_error(exc: BaseException) -> GatewayError:
    """Busy/unreachable engines are retryable (503); anything else the engine raised is a 502."""
    unavailable = isinstance(exc, (TimeoutError, asyncio.TimeoutError, ConnectionError))
    return GatewayError(
        503 if unavailable else 502,
        f"Inference engine failed: {type(exc).__name__}: {exc}",
        type="server_error",
        code="engine_unavailable" if unavailable else "engine_error",
    )


def _token_text_fn(engine: Engine) -> Callable[[int], str]:
    """Token id -> text for logprobs, via the engine's tokenizer when it exposes one."""
    decode_token = getattr(engine, "decode_token", None)
    if callable(decode_token):
        return lambda tid: str(decode_token(tid))
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "decode"):
        return lambda tid: tokenizer.decode([tid])
    return lambda tid: ""


async def _validated_body(request: Request, model: type[_Body]) -> _Body:
    """The JSON body parsed into `model`; invalid input becomes an OpenAI-shaped 4xx."""
    raw = await _read_json(request)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise oai.validation_error_to_gateway(exc) from None


async def _read_json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise GatewayError(413, f"Request body too large ({len(raw)} bytes, limit {MAX_BODY_BYTES})")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise oai.invalid(f"Request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise oai.invalid("Request body must be a JSON object")
    return body


def _path_agent(request: Request) -> Optional[str]:
    """The agent name of an `/agent/{name}/v1` route (400 unless 1-128 chars of [A-Za-z0-9_.-])."""
    name = request.path_params.get("agent_name")
    if name is None:
        return None
    if not is_valid_agent_name(name):
        raise GatewayError(
            400,
            f"Invalid agent name {name[:200]!r}: use 1-128 characters of A-Z a-z 0-9 _ . -",
            param="agent_name",
            code="invalid_agent_name",
        )
    return name


def _sse(obj: Any, event: Optional[str] = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {oai.dumps(obj)}\n\n"


class _Target:
    """Where a call's spans go (None ids: not recorded)."""

    def __init__(self, store: Optional[Store], rollout_id: Optional[str], attempt_id: Optional[str]) -> None:
        self.store = store
        self.rollout_id = rollout_id
        self.attempt_id = attempt_id

    @property
    def recorded(self) -> bool:
        return self.store is not None and self.rollout_id is not None and self.attempt_id is not None


class _Gateway:
    def __init__(self, get_store: StoreGetter, get_engine: EngineGetter, default_max_tokens: Optional[int]) -> None:
        self._get_store = get_store
        self._get_engine = get_engine
        self._default_max_tokens = default_max_tokens

    # ------------------------------------------------------------------ shared steps

    def _engine(self, request: Request) -> Engine:
        engine = self._get_engine(request)
        if engine is None:
            raise GatewayError(
                503,
                "No inference engine is attached to this server (start it with an engine, e.g. `--engine tiny`)",
                type="server_error",
                code="engine_missing",
            )
        return engine

    async def _target(self, request: Request) -> _Target:
        _path_agent(request)  # reject a bad name before anything else happens
        rid = request.path_params.get("rollout_id") or request.headers.get(Headers.rollout_id)
        aid = request.path_params.get("attempt_id") or request.headers.get(Headers.attempt_id)
        if rid is None and aid is None:
            return _Target(None, None, None)
        if not rid or not aid:
            raise oai.invalid(f"Both {Headers.rollout_id} and {Headers.attempt_id} are needed to record a call")
        store = self._get_store(request)
        if store is None:
            raise GatewayError(503, "No store is attached to this server", type="server_error", code="store_missing")
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
        return _Target(store, rid, aid)

    async def _record(self, target: _Target, spans: list[SpanIn]) -> None:
        if not target.recorded or not spans:
            return
        try:
            await target.store.add_spans(spans)  # type: ignore[union-attr]
        except StoreError as exc:  # e.g. the attempt finished while the engine was generating
            log.warning("gateway: span for %s/%s not stored: %s", target.rollout_id, target.attempt_id, exc)
        except Exception:
            log.exception("gateway: storing span for %s/%s failed", target.rollout_id, target.attempt_id)

    def _context(
        self,
        request: Request,
        target: _Target,
        api: str,
        call_id: str,
        engine_req: ChatRequest,
        body: Any,
        stream: bool,
    ) -> CallContext:
        agent = resolve_agent_name(
            request.headers,
            getattr(body, "metadata", None),
            getattr(body, "user", None),
            engine_req.messages,
            path_agent=_path_agent(request),
        )
        engine_req.agent = agent  # the engine serves this agent's own weights when it has them
        return CallContext(
            rollout_id=target.rollout_id or "",
            attempt_id=target.attempt_id or "",
            api=api,
            call_id=call_id,
            agent_name=agent,
            engine_request=engine_req,
            start_time=time.time(),
            stream=stream,
        )

    async def _chat(self, engine: Engine, engine_req: ChatRequest, ctx: CallContext, target: _Target) -> ChatResult:
        try:
            result = await engine.chat(engine_req)
        except Exception as exc:
            await self._fail(engine, exc, ctx, target)
        if not result.choices:
            await self._fail(engine, RuntimeError("engine returned no choices"), ctx, target)
        return _echo_model(result, engine_req)

    async def _fail(self, engine: Engine, exc: BaseException, ctx: CallContext, target: _Target) -> Any:
        log.warning("gateway: engine failed (%s): %s", ctx.api, exc, exc_info=exc)
        if target.recorded:
            await self._record(target, [span_for_error(ctx, exc, time.time(), _safe_version(engine, ctx.agent_name))])
        raise _engine_error(exc) from exc

    async def _open_stream(
        self, engine: Engine, engine_req: ChatRequest, ctx: CallContext, target: _Target
    ) -> tuple[StreamDelta, AsyncIterator[StreamDelta]]:
        """Start the engine stream and wait for its first delta, so early failures get a JSON error status."""
        agen = engine.chat_stream(engine_req)
        try:
            first = await agen.__anext__()
        except StopAsyncIteration:
            await self._fail(engine, RuntimeError("engine stream ended without output"), ctx, target)
        except Exception as exc:
            await self._fail(engine, exc, ctx, target)
        return first, agen

    async def _drain(
        self,
        engine: Engine,
        first: StreamDelta,
        agen: AsyncIterator[StreamDelta],
        ctx: CallContext,
        target: _Target,
    ) -> AsyncIterator[tuple[str, Optional[ChatResult]]]:
        """Yield (text, final result or None) per delta, the result last; records an error span on failure."""
        delta: Optional[StreamDelta] = first
        try:
            while delta is not None:
                if delta.final is not None:
                    yield delta.text, _echo_model(delta.final, ctx.engine_request)
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
        log.warning("gateway: engine stream failed: %s", exc)
        if target.recorded:
            await self._record(target, [span_for_error(ctx, exc, time.time(), _safe_version(engine, ctx.agent_name))])
        raise _engine_error(exc)

    # ------------------------------------------------------------------ /models

    async def models(self, request: Request) -> JSONResponse:
        try:
            _path_agent(request)
        except GatewayError as err:
            return _error_response(err)
        engine = self._get_engine(request)
        data = []
        if engine is not None:
            data.append(
                {
                    "id": engine.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "agentkiln",
                    "version": _safe_version(engine),
                }
            )
        return JSONResponse({"object": "list", "data": data})

    # ------------------------------------------------------------------ /chat/completions

    async def chat_completions(self, request: Request) -> Any:
        try:
            return await self._chat_completions(request)
        except GatewayError as err:
            return _error_response(err)

    async def _chat_completions(self, request: Request) -> Any:
        body = await _validated_body(request, oai.ChatCompletionRequest)
        engine_req = oai.chat_request_to_engine(body, self._default_max_tokens)
        engine = self._engine(request)
        target = await self._target(request)
        call_id = oai.new_chat_id()
        created = oai.now_s()
        stream = bool(body.stream)
        ctx = self._context(request, target, "chat.completions", call_id, engine_req, body, stream)
        token_text = _token_text_fn(engine)
        want_lp = bool(body.logprobs)
        want_ids = bool(body.return_token_ids)

        def body_for(result: ChatResult, choices: Optional[list] = None) -> dict[str, Any]:
            return oai.chat_completion_out(
                result,
                completion_id=call_id,
                created=created,
                logprobs=want_lp,
                token_text=token_text,
                choices=choices,
                token_ids=want_ids,
            )

        async def finish(result: ChatResult, full: Optional[dict[str, Any]] = None) -> None:
            def for_choice(i: int) -> dict[str, Any]:
                if full is not None and len(result.choices) == 1:
                    return full  # the answer itself: build it once
                return body_for(result, [result.choices[i]])

            await self._record(target, spans_for_result(ctx, result, time.time(), for_choice))

        if not stream:
            result = await self._chat(engine, engine_req, ctx, target)
            answer = body_for(result)
            await finish(result, answer)
            return JSONResponse(answer)

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunk = lambda choices, usage=None: oai.chat_chunk(  # noqa: E731
            call_id, created, engine_req.model or engine.model_name, choices, usage, with_usage=include_usage
        )
        # Tool calls are only known once the whole turn is parsed, and per-token logprobs only at the end,
        # so those cases (and n > 1) stream the finished result as chunks.
        if engine_req.n > 1 or engine_req.tools or want_lp:
            result = await self._chat(engine, engine_req, ctx, target)
            await finish(result)
            return await _sse_response(
                _chat_buffered_events(result, chunk, include_usage, want_lp, token_text), complete=True
            )
        first, agen = await self._open_stream(engine, engine_req, ctx, target)

        async def events() -> AsyncIterator[str]:
            # What is ready goes out in one write: the role chunk with the first text, the last
            # text with the finish chunk, usage and [DONE].
            out = _sse(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None}]))  # fmt: skip
            try:
                async for text, result in self._drain(engine, first, agen, ctx, target):
                    if text:
                        out += _sse(
                            chunk([{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])
                        )
                    if result is not None:
                        await finish(result)
                        out += _sse(
                            chunk(
                                [{"index": 0, "delta": {}, "logprobs": None,
                                  "finish_reason": result.choices[0].finish_reason}]
                            )
                        )  # fmt: skip
                        if include_usage:
                            out += _sse(chunk([], oai.chat_usage(result)))
                        out += "data: [DONE]\n\n"
                    yield out
                    out = ""
            except GatewayError as err:
                yield out + _sse(err.body())

        return await _sse_response(events(), complete=first.final is not None)

    # ------------------------------------------------------------------ /responses

    async def responses(self, request: Request) -> Any:
        try:
            return await self._responses(request)
        except GatewayError as err:
            return _error_response(err)

    async def _responses(self, request: Request) -> Any:
        body = await _validated_body(request, oai.ResponsesRequest)
        engine_req = oai.responses_request_to_engine(body, self._default_max_tokens)
        engine = self._engine(request)
        target = await self._target(request)
        response_id = oai.new_response_id()
        created = oai.now_s()
        stream = bool(body.stream)
        ctx = self._context(request, target, "responses", response_id, engine_req, body, stream)
        token_text = _token_text_fn(engine)

        def body_for(result: ChatResult) -> dict[str, Any]:
            return oai.response_from_result(
                body, result, response_id=response_id, created_at=created, token_text=token_text
            )

        async def finish(result: ChatResult) -> dict[str, Any]:
            final = body_for(result)
            await self._record(target, spans_for_result(ctx, result, time.time(), lambda i: final))
            return final

        if not stream:
            result = await self._chat(engine, engine_req, ctx, target)
            return JSONResponse(await finish(result))

        ev = _ResponseEvents(body, response_id, created, engine_req.model or engine.model_name)
        if engine_req.tools or "message.output_text.logprobs" in (body.include or []):
            result = await self._chat(engine, engine_req, ctx, target)
            final = await finish(result)
            return await _sse_response(ev.buffered(final), complete=True)

        first, agen = await self._open_stream(engine, engine_req, ctx, target)

        async def events() -> AsyncIterator[str]:
            msg_id = f"msg_{uuid.uuid4().hex[:24]}"
            out = ev.start() + ev.message_added(msg_id, 0)  # goes out with the first text
            try:
                async for text, result in self._drain(engine, first, agen, ctx, target):
                    if text:
                        out += ev.text_delta(msg_id, 0, text)
                    if result is not None:
                        final = await finish(result)
                        # Keep the id the client already saw for the streamed message item.
                        for item in final["output"]:
                            if item["type"] == "message":
                                item["id"] = msg_id
                        for i, item in enumerate(final["output"]):
                            out += ev.message_done(item, i) if item["type"] == "message" else ev.function_call(item, i)
                        out += ev.end(final)
                    yield out
                    out = ""
            except GatewayError as err:
                yield out + ev.error(err)

        return await _sse_response(events(), complete=first.final is not None)


# --------------------------------------------------------------------------- stream writers


async def _sse_response(events: AsyncIterator[str], *, complete: bool) -> Response:
    """An event stream; when the engine already finished (`complete`), all events in one plain response.

    A finished answer gains nothing from chunked streaming, and skipping the streaming machinery
    (a task group and one write per event) is most of what a fast upstream's stream costs here.
    """
    if complete:
        body = "".join([e async for e in events])
        return Response(body.encode(), media_type="text/event-stream", headers=_SSE_HEADERS)
    return StreamingResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)



async def _chat_buffered_events(
    result: ChatResult,
    chunk: Callable[..., dict[str, Any]],
    include_usage: bool,
    want_lp: bool,
    token_text: Callable[[int], str],
) -> AsyncIterator[str]:
    """A finished result as OpenAI chunks: role, content (+logprobs), tool_calls, finish, usage."""
    for choice in result.choices:
        i = choice.index
        yield _sse(
            chunk(
                [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
            )
        )
        if choice.text or want_lp:
            lp = {"content": oai.logprob_content(choice, token_text), "refusal": None} if want_lp else None
            yield _sse(chunk([{"index": i, "delta": {"content": choice.text}, "logprobs": lp, "finish_reason": None}]))
        for k, tc in enumerate(choice.tool_calls):
            delta = {
                "tool_calls": [
                    {
                        "index": k,
                        "id": tc.id,
                        "type": "function",
                        "function": {"name": tc.name, "arguments": tc.arguments},
                    }
                ]
            }
            yield _sse(chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]))
        yield _sse(chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": choice.finish_reason}]))
    if include_usage:
        yield _sse(chunk([], oai.chat_usage(result)))
    yield "data: [DONE]\n\n"


class _ResponseEvents:
    """Builds the Responses API event sequence (what the openai SDK and openai-agents parse)."""

    def __init__(self, req: oai.ResponsesRequest, response_id: str, created: int, model: str) -> None:
        self.req = req
        self.response_id = response_id
        self.created = created
        self.model = model
        self.seq = 0

    def _event(self, type_: str, **fields: Any) -> str:
        data = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return _sse(data, event=type_)

    def _shell(self, status: str) -> dict[str, Any]:
        return oai.response_object(
            self.req, response_id=self.response_id, created_at=self.created, model=self.model, status=status, output=[]
        )

    def start(self) -> str:
        return self._event("response.created", response=self._shell("in_progress")) + self._event(
            "response.in_progress", response=self._shell("in_progress")
        )

    def message_added(self, msg_id: str, index: int) -> str:
        item = {"id": msg_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}
        return self._event("response.output_item.added", output_index=index, item=item) + self._event(
            "response.content_part.added",
            item_id=msg_id,
            output_index=index,
            content_index=0,
            part=oai.response_text_part(""),
        )

    def text_delta(self, msg_id: str, index: int, text: str) -> str:
        return self._event(
            "response.output_text.delta", item_id=msg_id, output_index=index, content_index=0, delta=text, logprobs=[]
        )

    def message_done(self, item: dict[str, Any], index: int) -> str:
        part = item["content"][0]
        return (
            self._event(
                "response.output_text.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                text=part["text"],
                logprobs=part.get("logprobs", []),
            )
            + self._event(
                "response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part
            )
            + self._event("response.output_item.done", output_index=index, item=item)
        )

    def function_call(self, item: dict[str, Any], index: int) -> str:
        added = {**item, "status": "in_progress", "arguments": ""}
        return (
            self._event("response.output_item.added", output_index=index, item=added)
            + self._event(
                "response.function_call_arguments.delta",
                item_id=item["id"],
                output_index=index,
                delta=item["arguments"],
            )
            + self._event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                name=item["name"],
                arguments=item["arguments"],
            )
            + self._event("response.output_item.done", output_index=index, item=item)
        )

    def end(self, final: dict[str, Any]) -> str:
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        return self._event(kind, response=final)

    async def buffered(self, final: dict[str, Any]) -> AsyncIterator[str]:
        yield self.start()
        for i, item in enumerate(final["output"]):
            if item["type"] == "message":
                yield self.message_added(item["id"], i)
                text = item["content"][0]["text"]
                if text:
                    yield self.text_delta(item["id"], i, text)
                yield self.message_done(item, i)
            else:
                yield self.function_call(item, i)
        yield self.end(final)

    def error(self, err: GatewayError) -> str:
        failed = self._shell("failed")
        failed["error"] = {"code": err.code or "server_error", "message": err.message}
        return self._event("error", code=err.code, message=err.message, param=err.param) + self._event(
            "response.failed", response=failed
        )


def _echo_model(result: ChatResult, engine_req: ChatRequest) -> ChatResult:
    """Answer under the model name the client asked for (clients check it); spans keep the real version."""
    if engine_req.model and engine_req.model != result.model:
        return result.model_copy(update={"model": engine_req.model})
    return result


def _safe_version(engine: Engine, agent: Optional[str] = None) -> Optional[str]:
    try:
        return engine.version_for(agent) if hasattr(engine, "version_for") else engine.model_version
    except Exception:
        return None


async def _aclose(agen: AsyncIterator[Any]) -> None:
    aclose = getattr(agen, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            log.debug("gateway: closing engine stream failed", exc_info=True)
