"""Instant OpenAI-compatible chat backend for benchmarks (stdlib only, so both venvs can run it).

A raw asyncio HTTP/1.1 server with keep-alive: `POST .../chat/completions` (streaming and not)
answers at once with fixed text, vLLM-style token ids (`prompt_token_ids`, per-choice
`token_ids`) and logprobs; `GET .../models` lists one model. Anything else gets a 404.
It does the least work an HTTP server can, so latency measured through a proxy in front of
it is the proxy's.

Run: `python bench/mock_openai.py --port 8999` (prints `READY <port>` once listening), or
`start_mock()` from a benchmark to get a subprocess and its base URL.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import json
import os
import socket
import subprocess
import sys
import time

MODEL = "mock-model"
TEXT = "The answer is 42."
PROMPT_IDS = list(range(1, 33))
RESPONSE_IDS = [101, 102, 103, 104, 105]
TOKENS = ["The", " answer", " is", " 42", "."]


def _completion() -> bytes:
    body = {
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": MODEL,
            "prompt_token_ids": PROMPT_IDS,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": TEXT},
                    "logprobs": {
                        "content": [
                            {"token": t, "logprob": -0.1, "bytes": None, "top_logprobs": []} for t in TOKENS
                        ]
                    },
                    "finish_reason": "stop",
                    "token_ids": RESPONSE_IDS,
                }
            ],
            "usage": {"prompt_tokens": len(PROMPT_IDS), "completion_tokens": len(RESPONSE_IDS),
                      "total_tokens": len(PROMPT_IDS) + len(RESPONSE_IDS)},
        }  # fmt: skip
    return json.dumps(body, separators=(",", ":")).encode()


_NONSTREAM = _completion()


def _stream_body() -> bytes:
    """All SSE events of one streamed answer, token by token, ending with usage and [DONE]."""
    created = int(time.time())
    events = []
    base = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": created, "model": MODEL}
    first = dict(base, prompt_token_ids=PROMPT_IDS,
                 choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])  # fmt: skip
    events.append(first)
    for tok, tid in zip(TOKENS, RESPONSE_IDS):
        events.append(dict(base, choices=[{
            "index": 0, "delta": {"content": tok}, "token_ids": [tid],
            "logprobs": {"content": [{"token": tok, "logprob": -0.1, "bytes": None, "top_logprobs": []}]},
            "finish_reason": None}]))  # fmt: skip
    events.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    events.append(dict(base, choices=[], usage={"prompt_tokens": len(PROMPT_IDS),
                                                "completion_tokens": len(RESPONSE_IDS),
                                                "total_tokens": len(PROMPT_IDS) + len(RESPONSE_IDS)}))  # fmt: skip
    out = b"".join(b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events)
    return out + b"data: [DONE]\n\n"


_STREAM = _stream_body()
_MODELS = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0,
                                                  "owned_by": "mock"}]}).encode()  # fmt: skip


def _response(status: str, ctype: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + ctype
        + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\nconnection: keep-alive\r\n\r\n" + body
    )  # fmt: skip


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            method, path, _ = lines[0].split(b" ", 2)
            length = 0
            chunked = False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
            if chunked:  # rare (some clients); read chunks until the empty one
                body = b""
                while True:
                    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                    chunk = await reader.readexactly(size + 2)
                    if size == 0:
                        break
                    body += chunk[:-2]
            else:
                body = await reader.readexactly(length) if length else b""
            if method == b"POST" and path.rstrip(b"/").endswith(b"/chat/completions"):
                stream = b'"stream":true' in body.replace(b" ", b"")
                if stream:
                    writer.write(_response("200 OK", b"text/event-stream", _STREAM))
                else:
                    writer.write(_response("200 OK", b"application/json", _NONSTREAM))
            elif method == b"GET" and path.rstrip(b"/").endswith(b"/models"):
                writer.write(_response("200 OK", b"application/json", _MODELS))
            else:
                writer.write(_response("404 Not Found", b"application/json", b'{"error":{"message":"not found"}}'))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def serve(port: int, host: str = "127.0.0.1") -> None:
    server = await asyncio.start_server(_handle, host, port, backlog=1024)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


class FastClient:
    """Minimal keep-alive HTTP/1.1 client (POST JSON, read the whole answer) for benchmark load.

    httpx spends about a millisecond of CPU per request and its pool slows down with many
    connections; with two cores that would measure the load generator, not the server.
    Handles content-length and chunked answers (uvicorn streams SSE chunked).
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.retries_503 = 0
        self.stale_retries = 0

    @classmethod
    def for_url(cls, url: str) -> FastClient:
        hostport = url.split("://", 1)[1].split("/", 1)[0]
        host, _, port = hostport.rpartition(":")
        return cls(host, int(port))

    # What a well-behaved client does under load: a pooled connection the server closed meanwhile
    # (keep-alive timeout, a shedding server) is retried once on a fresh one, and a 503 is retried
    # after its Retry-After. The first version of this client did neither, so at 300+ runners one
    # stale connection (IncompleteReadError) failed a whole benchmark round.
    max_503_retries = 20

    async def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        for _ in range(self.max_503_retries):
            status, data, retry_after = await self._post_once(path, body, headers)
            if status != 503:
                return status, data
            self.retries_503 += 1
            await asyncio.sleep(retry_after * (1 + random.random() / 2))
        return status, data

    async def _post_once(
        self, path: str, body: bytes, headers: dict[str, str] | None
    ) -> tuple[int, bytes, float]:
        while self._idle:
            reader, writer = self._idle.pop()
            try:
                return await self._exchange(reader, writer, path, body, headers)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                    raise  # the server had started answering: not a stale connection
                self.stale_retries += 1
                writer.close()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return await self._exchange(reader, writer, path, body, headers)

    async def _exchange(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        path: str,
        body: bytes,
        headers: dict[str, str] | None,
    ) -> tuple[int, bytes, float]:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(
            f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{extra}\r\n".encode()
            + body
        )
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, chunked, close, retry_after = None, False, False, 0.5
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"retry-after":
                retry_after = float(value.strip() or 0.5)
            elif name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                close = b"close" in value.lower()
        if chunked:
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                data = await reader.readexactly(size + 2)
                if size == 0:
                    break
                parts.append(data[:-2])
            data = b"".join(parts)
        elif length is not None:
            data = await reader.readexactly(length)
        else:
            data = await reader.read()
            close = True
        if close:
            writer.close()
        else:
            self._idle.append((reader, writer))
        return status, data, retry_after

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mock(python: str = sys.executable) -> tuple[subprocess.Popen, str]:
    """Start the mock in a subprocess; returns (process, base URL ending in /v1)."""
    proc = subprocess.Popen(
        [python, os.path.abspath(__file__), "--port", "0"], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    line = proc.stdout.readline().strip()  # type: ignore[union-attr]
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"mock backend did not start: {line!r}")
    return proc, f"http://127.0.0.1:{line.split()[1]}/v1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8999)
    args = ap.parse_args()
    try:
        import uvloop  # type: ignore[import-not-found]

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
