"""The aiohttp session the upstream engine keeps: shared by every agent's calls, lean per request."""

from __future__ import annotations

import asyncio
import json

from agentkiln.engine.upstream import UpstreamEngine, transport
from tests.test_upstream_transport import COMPLETION, REQ, Server


async def test_upstream_cookies_do_not_follow_one_call_into_the_next():
    body = json.dumps(COMPLETION).encode()
    answer = b"HTTP/1.1 200 OK\r\nset-cookie: session=agent-a; Path=/\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    server = Server(answer=answer)
    async with server:
        # "localhost", not an IP address: aiohttp's default cookie jar would keep this cookie.
        engine = UpstreamEngine(f"http://localhost:{server.port}/v1", model="m", timeout_s=5)
        try:
            await engine.chat(REQ)
            await engine.chat(REQ)
        finally:
            await engine.close()
    assert len(server.heads) == 2
    assert all(b"\ncookie:" not in head.lower() for head in server.heads)
    assert all(b"\nuser-agent: agentkiln\r\n" in head.lower() for head in server.heads)


async def test_stream_whose_end_came_with_done_is_not_drained(monkeypatch):
    """The usual stream ends in the read that carried [DONE]: no drain timer, and the connection is reused."""
    delays: list[float | None] = []
    real_timeout = asyncio.timeout

    def counting_timeout(delay):
        delays.append(delay)
        return real_timeout(delay)

    monkeypatch.setattr(transport.asyncio, "timeout", counting_timeout)
    server = Server(chunked=False)
    async with server as engine:
        for _ in range(3):
            deltas = [d async for d in engine.chat_stream(REQ)]
            assert deltas[-1].final is not None and deltas[-1].final.choices[0].text == "Hi"
    assert transport._DRAIN_S not in delays
    assert server.connections == 1
