"""UpstreamEngine's lean HTTP client (plain http://, no transport injected) against a real loopback server."""

from __future__ import annotations

import asyncio
import json

import pytest

from agentkiln.engine.base import ChatRequest
from agentkiln.engine.upstream import UpstreamEngine, UpstreamStatusError

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


class Server:
    """HTTP/1.1 server; `close_after` answers per connection then closes it; `chunked` streams chunked."""

    def __init__(self, *, status: int = 200, close_after: int = 0, chunked: bool = True) -> None:
        self.status, self.close_after, self.chunked = status, close_after, chunked
        self.requests: list[dict] = []
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
                assert head.startswith(b"POST /v1/chat/completions ")
                assert b"authorization: Bearer sk-x" in head
                self.requests.append(body)
                if self.status != 200:
                    payload = b'{"error": "busy"}'
                    writer.write(
                        b"HTTP/1.1 %d Err\r\ncontent-length: %d\r\n\r\n%s" % (self.status, len(payload), payload)
                    )
                elif body.get("stream"):
                    sse = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in CHUNKS) + b"data: [DONE]\n\n"
                    if self.chunked:
                        parts = [sse[i : i + 17] for i in range(0, len(sse), 17)]
                        data = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
                        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + data)
                    else:
                        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(sse), sse))
                else:
                    payload = json.dumps(COMPLETION).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(payload), payload))
                await writer.drain()
                served += 1
                if self.close_after and served >= self.close_after:
                    break
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> UpstreamEngine:
        self._server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.engine = UpstreamEngine(f"http://127.0.0.1:{port}/v1", model="m", api_key="sk-x", timeout_s=5)
        assert self.engine._lean is not None
        return self.engine

    async def __aexit__(self, *exc: object) -> None:
        await self.engine.close()
        self._server.close()


REQ = ChatRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=4)


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
    assert server.requests[0]["return_token_ids"] is True and server.requests[1]["stream"] is True


async def test_idle_connection_closed_by_server_is_replaced():
    server = Server(close_after=1)
    async with server as engine:
        for _ in range(3):
            assert (await engine.chat(REQ)).choices[0].text == "Hi"
            await asyncio.sleep(0.05)  # let the close reach the client
    assert server.connections == 3 and len(server.requests) == 3  # each request sent once


async def test_error_status_and_unreachable_upstream():
    async with Server(status=503) as engine:
        with pytest.raises(UpstreamStatusError, match="503"):
            await engine.chat(REQ)
        with pytest.raises(UpstreamStatusError, match="503"):
            [d async for d in engine.chat_stream(REQ)]
    dead = UpstreamEngine("http://127.0.0.1:9/v1", model="m")
    with pytest.raises(ConnectionError):
        await dead.chat(REQ)
