"""The HTTP server keeps httptools' speed with h11's bound on the request head (issue 13)."""

from __future__ import annotations

import socket

import httpx

from agentkiln.server.app import create_app
from agentkiln.server.http_protocol import MAX_HEAD_BYTES, BoundedHttpToolsProtocol
from agentkiln.server.serve import ServerThread, uvicorn_config
from agentkiln.store import InMemoryStore


def _raw(url: str, head: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def test_server_config_uses_the_bounded_httptools_protocol() -> None:
    assert uvicorn_config(object()).http is BoundedHttpToolsProtocol


def test_oversized_head_gets_431_and_the_server_keeps_serving() -> None:
    with ServerThread(create_app(InMemoryStore(sweep_interval_s=None), sweep_interval_s=0)) as server:
        big = b"".join(b"x-pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(MAX_HEAD_BYTES // 1000 + 2))
        answer = _raw(server.url, b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n" + big + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
        long_url = b"GET /health?" + b"q" * (MAX_HEAD_BYTES + 10) + b" HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"
        assert _raw(server.url, long_url).startswith(b"HTTP/1.1 431 ")
        # a large but allowed head is served, and so is everything after the refusals
        fine = b"x-pad: " + b"a" * (MAX_HEAD_BYTES // 2) + b"\r\n"
        ok = _raw(server.url, b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n" + fine + b"\r\n")
        assert ok.startswith(b"HTTP/1.1 200 ")
        assert httpx.get(server.url + "/health").status_code == 200
