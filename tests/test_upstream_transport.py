"""UpstreamEngine over real sockets (aiohttp transport) against a raw asyncio HTTP/1.1 server.

Covers what the engine relies on from the transport: keep-alive reuse, replacing connections the
server closed, many concurrent calls, deltas per network read, env proxies, and the mapping of
every upstream failure to the `agentkiln.engine.errors` family.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from email.utils import formatdate

import httpx
import pytest

from agentkiln.engine.base import ChatRequest
from agentkiln.engine.errors import EngineError, EngineRequestError, EngineResponseError, EngineUnavailable
from agentkiln.engine.upstream import UpstreamEngine
from agentkiln.engine.upstream.transport import AiohttpTransport, env_proxy, retry_after_s

COMPLETION = {
    "id": "c1",
    "prompt_token_ids": [1, 2, 3],
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hi"},
            "token_ids": [7, 8],
            "logprobs": {"content": [{"token": "H", "logprob": -0.1}, {"token": "i", "logprob": -0.2}]},
            "finish_reason": "stop",
        }
    ],
}
CHUNKS = [
    {"prompt_token_ids": [1, 2, 3], "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
    {"choices": [{"index": 0, "delta": {"content": "Hi"}, "token_ids": [7],
                  "logprobs": {"content": [{"token": "Hi", "logprob": -0.1}]}}]},
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
]  # fmt: skip
SSE = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in CHUNKS) + b"data: [DONE]\n\n"
REQ = ChatRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=4)


class Server:
    """HTTP/1.1 server. `close_after`: answers per connection, then close; `answer`: raw bytes
    to send instead of a normal answer (None: hang without answering); `chunked` streams chunked."""

    def __init__(
        self, *, close_after: int = 0, chunked: bool = True, answer: bytes | None = b"", timeout_s: float = 5.0
    ) -> None:
        self.close_after, self.chunked, self.answer, self.timeout_s = close_after, chunked, answer, timeout_s
        self.requests: list[dict] = []
        self.heads: list[bytes] = []
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                body = json.loads(await reader.readexactly(length))
                self.heads.append(head)
                self.requests.append(body)
                if self.answer is None:
                    await asyncio.sleep(3600)
                elif self.answer:
                    writer.write(self.answer)
                elif body.get("stream"):
                    await self.stream(writer)
                else:
                    payload = json.dumps(COMPLETION).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(payload), payload))
                await writer.drain()
                served += 1
                if self.close_after and served >= self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stream(self, writer: asyncio.StreamWriter) -> None:
        if self.chunked:
            parts = [SSE[i : i + 17] for i in range(0, len(SSE), 17)]
            data = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + data)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(SSE), SSE))

    async def __aenter__(self) -> UpstreamEngine:
        self._server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{self.port}/v1"
        self.engine = UpstreamEngine(base, model="m", api_key="sk-x", timeout_s=self.timeout_s)
        assert isinstance(self.engine._http, AiohttpTransport)
        return self.engine

    async def __aexit__(self, *exc: object) -> None:
        await self.engine.close()
        self._server.close()


def _answer(status: int, body: bytes = b'{"error": {"message": "nope"}}', headers: str = "") -> bytes:
    return b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n%s\r\n%s" % (status, len(body), headers.encode(), body)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _call(engine: UpstreamEngine, stream: bool):
    if stream:
        return [d async for d in engine.chat_stream(REQ)]
    return await engine.chat(REQ)


@pytest.mark.parametrize("chunked", [True, False])
async def test_chat_and_stream_reuse_one_connection(chunked):
    server = Server(chunked=chunked)
    async with server as engine:
        for _ in range(3):
            result = await engine.chat(REQ)
            assert result.prompt_ids == [1, 2, 3]
            assert result.choices[0].response_ids == [7, 8] and result.choices[0].logprobs == [-0.1, -0.2]
            deltas = [d async for d in engine.chat_stream(REQ)]
            final = deltas[-1].final
            assert final is not None and final.choices[0].text == "Hi" and final.choices[0].response_ids == [7]
    assert server.connections == 1
    head = server.heads[0].lower()
    assert head.startswith(b"post /v1/chat/completions ") and b"authorization: bearer sk-x" in head
    assert server.requests[0]["return_token_ids"] is True and server.requests[1]["stream"] is True


async def test_idle_connection_closed_by_server_is_replaced():
    server = Server(close_after=1)
    async with server as engine:
        for _ in range(3):
            assert (await engine.chat(REQ)).choices[0].text == "Hi"
            await asyncio.sleep(0.05)  # let the close reach the client
    assert server.connections == 3 and len(server.requests) == 3  # each request sent once


async def test_many_concurrent_calls_share_a_pool():
    """1,000 calls at once all succeed (no pool limit that fails or stalls them) and their
    connections stay pooled: the next burst opens none."""
    server = Server()
    async with server as engine:
        results = await asyncio.gather(*(engine.chat(REQ) for _ in range(1000)))
        assert all(r.choices[0].response_ids == [7, 8] for r in results)
        opened = server.connections
        await asyncio.gather(*(engine.chat(REQ) for _ in range(200)))
    assert len(server.requests) == 1200 and opened <= 1000 and server.connections == opened


async def test_stream_delta_arrives_before_the_stream_ends():
    """A delta is yielded per network read, not after the body: the server waits for the client to see it."""
    seen = asyncio.Event()

    class Slow(Server):
        async def stream(self, writer):
            first, rest = SSE.split(b"\n\n", 2)[:2], SSE.split(b"\n\n", 2)[2]
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(SSE))
            writer.write(b"\n\n".join(first) + b"\n\n")
            await writer.drain()
            await asyncio.wait_for(seen.wait(), 5)
            writer.write(rest)

    async with Slow() as engine:
        deltas = []
        async for d in engine.chat_stream(REQ):
            deltas.append(d)
            seen.set()
    assert deltas[0].text == "Hi" and deltas[0].final is None and deltas[-1].final is not None
    assert deltas[-1].final.choices[0].response_ids == [7]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("answer", "cls", "status", "retry_after"),
    [
        (_answer(429, headers="Retry-After: 7\r\n"), EngineUnavailable, 429, 7.0),
        (_answer(503), EngineUnavailable, 503, 1.0),
        (_answer(400, b'{"error": {"message": "max_tokens is too large"}}'), EngineRequestError, 400, None),
        (_answer(404), EngineRequestError, 404, None),
        (_answer(500), EngineResponseError, 500, None),
        (_answer(502), EngineResponseError, 502, None),
    ],
)
async def test_upstream_status_maps_to_engine_errors(answer, cls, status, retry_after, stream):
    async with Server(answer=answer) as engine:
        with pytest.raises(cls) as info:
            await _call(engine, stream)
    err = info.value
    assert type(err) is cls and err.upstream_status == status and f"HTTP {status}" in str(err)
    assert err.retryable is (cls is EngineUnavailable)
    if retry_after is not None:
        assert err.retry_after_s == retry_after
    if status == 400:
        assert "max_tokens is too large" in str(err)  # the upstream's reason reaches the caller


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_unreachable_upstream_is_retryable(scheme, stream):
    """Today's gap: an https upstream that is down was a non-retryable 502."""
    dead = UpstreamEngine(f"{scheme}://127.0.0.1:{_closed_port()}/v1", model="m", timeout_s=5)
    with pytest.raises(EngineUnavailable) as info:
        await _call(dead, stream)
    await dead.close()
    assert info.value.retryable and info.value.retry_after_s == 1.0


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_hanging_past_the_timeout_is_retryable(stream):
    async with Server(answer=None, timeout_s=0.3) as engine:
        with pytest.raises(EngineUnavailable, match="timed out"):
            await asyncio.wait_for(_call(engine, stream), 5)


async def test_stream_stalling_mid_answer_times_out():
    class Stall(Server):
        async def stream(self, writer):
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(3600)

    async with Stall(timeout_s=0.3) as engine:
        with pytest.raises(EngineUnavailable):
            await asyncio.wait_for(_call(engine, True), 5)


@pytest.mark.parametrize(
    ("answer", "stream", "cls"),
    [
        (_answer(200, b"<html>oops</html>"), False, EngineResponseError),
        (_answer(200, b"[1, 2]"), False, EngineResponseError),
        (_answer(200, b"data: {not json\n\ndata: [DONE]\n\n"), True, EngineResponseError),
        (b'HTTP/1.1 200 OK\r\ncontent-length: 500\r\n\r\n{"id":', False, EngineUnavailable),  # closed mid-answer
        (b"garbage\r\n\r\n", False, EngineResponseError),
    ],
)
async def test_malformed_or_truncated_answers(answer, stream, cls):
    async with Server(answer=answer, close_after=1) as engine:
        with pytest.raises(EngineError) as info:
            await _call(engine, stream)
    assert type(info.value) is cls


async def test_env_proxy_is_used(monkeypatch):
    """A plain-http proxy from the environment gets the absolute-form request line."""
    proxy = Server()
    proxy_sock = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    port = proxy_sock.sockets[0].getsockname()[1]
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    engine = UpstreamEngine("http://upstream.invalid/v1", model="m", timeout_s=5)
    try:
        assert (await engine.chat(REQ)).choices[0].text == "Hi"
    finally:
        await engine.close()
        proxy_sock.close()
    assert proxy.heads[0].startswith(b"POST http://upstream.invalid/v1/chat/completions ")
    monkeypatch.setenv("NO_PROXY", "upstream.invalid")
    assert env_proxy("http://upstream.invalid/v1") is None


def test_retry_after_forms():
    assert retry_after_s("3") == 3.0 and retry_after_s("0.5") == 0.5 and retry_after_s(None) == 1.0
    assert retry_after_s("soon") == 1.0 and retry_after_s("-4") == 0.0
    assert 50 < retry_after_s(formatdate(time.time() + 60, usegmt=True)) <= 60


async def test_injected_httpx_transport_maps_errors_the_same_way():
    def handler(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content).get("stream"):
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(429, headers={"retry-after": "2"}, json={"error": "slow down"})

    engine = UpstreamEngine("http://fake/v1", model="m", transport=httpx.MockTransport(handler))
    with pytest.raises(EngineUnavailable) as info:
        await engine.chat(REQ)
    assert info.value.retry_after_s == 2.0 and info.value.upstream_status == 429
    with pytest.raises(EngineUnavailable):
        await _call(engine, True)
    await engine.close()
