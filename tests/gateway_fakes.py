"""Test doubles for the gateway tests: a scripted engine and a real loopback server.

ScriptedEngine answers from a script (fixed replies or a function of the request), so tests
can demand an exact answer or a tool call. Its "tokenizer" is one token per character
(id = code point), so decode(ids) == text holds exactly, as with a real tokenizer.
Tool-call markup is parsed with the real engine parser, so malformed calls behave as in production.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any, AsyncIterator, Callable, Coroutine, Optional, Sequence, TypeVar, Union

import uvicorn
from fastapi import FastAPI

from agentkiln.engine.base import ChatChoice, ChatRequest, ChatResult, Engine, StreamDelta
from agentkiln.engine.chat.tool_parsers.hermes import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, parse_tool_calls
from agentkiln.gateway.router import build_gateway_router
from agentkiln.store.base import Store

T = TypeVar("T")
Script = Union[Sequence[str], Callable[[ChatRequest], str]]


def tool_call_text(name: str, arguments: dict[str, Any]) -> str:
    """What a model emits to call a tool (the markup the engine parses)."""
    return f"{TOOL_CALL_OPEN}{json.dumps({'name': name, 'arguments': arguments})}{TOOL_CALL_CLOSE}"


def encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def decode(ids: Sequence[int]) -> str:
    return "".join(chr(i) for i in ids)


class ScriptedEngine(Engine):
    """Deterministic engine: the reply is the next scripted string (or script(request))."""

    def __init__(
        self,
        script: Script = ("Hello from the scripted engine.",),
        *,
        model_name: str = "scripted-model",
        version: str = "v1",
        fail_with: Optional[BaseException] = None,
        fail_stream_after: Optional[int] = None,
        fail_stream_with: Optional[BaseException] = None,
        stream_chunk_chars: int = 3,
    ) -> None:
        self.model_name = model_name
        self._version = version
        self._script = script
        self._next = 0
        self.fail_with = fail_with
        self.fail_stream_after = fail_stream_after  # raise after this many deltas
        self.fail_stream_with = fail_stream_with  # what is raised then (default: a RuntimeError)
        self.stream_chunk_chars = stream_chunk_chars
        self.requests: list[ChatRequest] = []

    @property
    def model_version(self) -> str:
        return self._version

    def token_text(self, token_id: int) -> str:
        return chr(token_id)

    def _reply(self, request: ChatRequest) -> str:
        if callable(self._script):
            return self._script(request)
        replies = list(self._script)
        reply = replies[min(self._next, len(replies) - 1)]
        self._next += 1
        return reply

    def _result(self, request: ChatRequest) -> ChatResult:
        self.requests.append(request)
        if self.fail_with is not None:
            raise self.fail_with
        prompt = json.dumps({"messages": request.messages, "tools": request.tools}, sort_keys=True)
        choices = []
        for i in range(request.n):
            full = encode(self._reply(request))
            ids = full[: request.max_tokens]
            raw = decode(ids)
            parsed = parse_tool_calls(raw, request.tools)
            if len(full) > len(ids):
                finish = "length"
            elif parsed.tool_calls:
                finish = "tool_calls"
            else:
                finish = "stop"
            choices.append(
                ChatChoice(
                    index=i,
                    text=parsed.text,
                    raw_text=raw,
                    tool_calls=parsed.tool_calls,
                    finish_reason=finish,
                    response_ids=ids,
                    logprobs=[-0.01 * (k % 7 + 1) for k in range(len(ids))],
                    parse_error=parsed.parse_error,
                )
            )
        return ChatResult(
            prompt_ids=encode(prompt),
            prompt_text=prompt,
            choices=choices,
            model=self.model_name,
            model_version=self._version,
        )

    async def chat(self, request: ChatRequest) -> ChatResult:
        await asyncio.sleep(0)
        return self._result(request)

    async def chat_stream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        result = self._result(request)
        ids = result.choices[0].response_ids
        step = self.stream_chunk_chars
        if step <= 0:  # the whole answer at once, as from an upstream whose stream came in one read
            yield StreamDelta(index=0, text=decode(ids), token_ids=ids, final=result)
            return
        for n, start in enumerate(range(0, len(ids), step)):
            if self.fail_stream_after is not None and n >= self.fail_stream_after:
                raise self.fail_stream_with or RuntimeError("scripted engine died mid-stream")
            await asyncio.sleep(0)
            chunk = ids[start : start + step]
            yield StreamDelta(index=0, text=decode(chunk), token_ids=chunk)
        yield StreamDelta(index=0, final=result)


def gateway_app(store: Optional[Store], engine: Optional[Engine], **router_kw: Any) -> FastAPI:
    """A FastAPI app with only the gateway router (independent of the full server app)."""
    app = FastAPI()
    app.state.store = store
    app.state.engine = engine
    app.include_router(build_gateway_router(**router_kw))
    return app


class ServedApp:
    """An ASGI app served by uvicorn on a free loopback port in a background thread.

    The store must only be touched from the server's loop (asyncio locks belong to one loop),
    so tests reach it through `call`.
    """

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._sock = sock
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._server.serve(sockets=[self._sock]))
        self.loop.close()

    def __enter__(self) -> "ServedApp":
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
        self._sock.close()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)
