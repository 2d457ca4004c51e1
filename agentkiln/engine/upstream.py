"""Engine that forwards to any OpenAI-compatible server (vLLM, SGLang, a hosted API).

Exact token ids matter for RL, so requests ask for `logprobs: true` and vLLM's
`return_token_ids: true`; vLLM then returns `prompt_token_ids` (top level) and per-choice
`token_ids`. Servers that ignore it get an approximation: the prompt is rendered with our
ChatML format and the answer re-tokenized with a local tokenizer. Those ids may differ from
what the server's model saw (different chat template, non-canonical tokenization of the
sampled text), and logprobs are dropped when their count does not match the ids, so such
spans are marked unusable for training rather than silently misaligned.

Per-agent weights: vLLM serves LoRA adapters under their own model names (`--lora-modules
writer=/path/to/adapter`, or its runtime `/v1/load_lora_adapter`). `agent_models={"writer":
"writer"}` sends the calls of agent "writer" to that model name (others use the request's model)
and records them as version "<model_version>:writer". This engine does not load weights itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from agentkiln.engine.base import ChatChoice, ChatRequest, ChatResult, Engine, StreamDelta, ToolCall
from agentkiln.engine.chat_format import format_tool_call, render_prompt

log = logging.getLogger(__name__)

_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "function_call": "tool_calls"}
_MAX_IDLE = 256  # kept-alive upstream connections


class UpstreamStatusError(RuntimeError):
    """The upstream answered with an HTTP error status."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"upstream answered HTTP {status}: {body[:500].decode('utf-8', 'replace')}")
        self.status = status


def _direct_http(base_url: str) -> bool:
    """Plain http:// with no proxy configured for the host: the lean client can serve it."""
    parts = urlsplit(base_url)
    if parts.scheme != "http" or not parts.hostname:
        return False
    proxies = urllib.request.getproxies()
    return not ("http" in proxies or "all" in proxies) or bool(urllib.request.proxy_bypass(parts.hostname))


class _Response:
    """Status, headers and a body reader over one kept-alive connection."""

    def __init__(self, reader: asyncio.StreamReader, status: int, headers: dict[bytes, bytes]) -> None:
        self.reader = reader
        self.status = status
        self.chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        length = headers.get(b"content-length")
        self.remaining = int(length) if length is not None and not self.chunked else None
        self.reusable = b"close" not in headers.get(b"connection", b"").lower() and (
            self.chunked or self.remaining is not None
        )
        self.done = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked, by length, or until the server closes)."""
        r = self.reader
        if self.chunked:
            while True:
                size = int((await r.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while (await r.readuntil(b"\r\n")) != b"\r\n":  # trailers
                        pass
                    break
                data = await r.readexactly(size + 2)
                yield data[:-2]
        elif self.remaining is not None:
            while self.remaining > 0:
                data = await r.read(min(self.remaining, 65536))
                if not data:
                    raise ConnectionError("upstream closed the connection mid-answer")
                self.remaining -= len(data)
                yield data
        else:
            while data := await r.read(65536):
                yield data
        self.done = True

    async def read(self) -> bytes:
        if self.remaining is not None and not self.chunked:
            data = await self.reader.readexactly(self.remaining) if self.remaining else b""
            self.remaining = 0
            self.done = True
            return data
        return b"".join([c async for c in self.chunks()])


def _dumps(body: dict[str, Any]) -> bytes:
    """A request body as JSON bytes (orjson, or json for what orjson cannot encode)."""
    try:
        return orjson.dumps(body)
    except TypeError:
        return json.dumps(body).encode()


def _loads(raw: bytes) -> Any:
    """Parse an upstream JSON body; orjson is several times faster on this per-token path.

    json accepts what orjson refuses (NaN / Infinity literals some servers write for logprobs).
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


async def line_batches(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[bytes]]:
    """Complete lines (without line ends) of a byte stream, one list per chunk that completed any.

    Batching per read lets a streaming proxy forward what arrived together in one write instead
    of one write per token event, which is most of a stream's cost when the upstream is fast.
    """
    buf = b""
    async for chunk in chunks:
        buf += chunk
        *complete, buf = buf.split(b"\n")
        if complete:
            yield [line.rstrip(b"\r") for line in complete]
    if buf:
        yield [buf.rstrip(b"\r")]


class _LeanHTTP:
    """Keep-alive HTTP/1.1 POST client on asyncio streams for plain-http upstreams.

    httpx costs about a millisecond of CPU per request (and its pool slows down with many
    connections); this is the gateway's hot path, so the common case (vLLM on http://) gets a
    client that does only what it needs. A request that finds its kept-alive connection
    closed by the server before any answer byte is sent once more on a fresh connection.
    """

    def __init__(self, base_url: str, headers: dict[str, str], timeout: float) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        host_header = parts.netloc.rsplit("@", 1)[-1]
        self._head = "".join(f"{k}: {v}\r\n" for k, v in {"host": host_header, **headers}.items())
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def _send(self, path: str, body: bytes) -> tuple[_Response, asyncio.StreamWriter]:
        request = (
            f"POST {self.prefix}{path} HTTP/1.1\r\n{self._head}content-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode() + body
        while True:
            reused = bool(self._idle)
            if reused:
                reader, writer = self._idle.pop()
            else:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                writer.close()
                if reused and (not isinstance(exc, asyncio.IncompleteReadError) or not exc.partial):
                    continue  # the server dropped an idle connection: try a fresh one
                raise ConnectionError(f"upstream connection failed: {exc!r}") from exc
            except BaseException:
                writer.close()
                raise
            lines = head[:-4].split(b"\r\n")
            try:
                status = int(lines[0].split(b" ", 2)[1])
            except (IndexError, ValueError):
                writer.close()
                raise ConnectionError(f"upstream sent a malformed status line: {lines[0][:100]!r}") from None
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            return _Response(reader, status, headers), writer

    def _release(self, resp: _Response, writer: asyncio.StreamWriter) -> None:
        if resp.done and resp.reusable and len(self._idle) < _MAX_IDLE and not writer.is_closing():
            self._idle.append((resp.reader, writer))
        else:
            writer.close()

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        async with asyncio.timeout(self.timeout):
            resp, writer = await self._send(path, body)
            try:
                data = await resp.read()
            except asyncio.IncompleteReadError as exc:
                writer.close()
                raise ConnectionError("upstream closed the connection mid-answer") from exc
            except BaseException:
                writer.close()
                raise
        self._release(resp, writer)
        return resp.status, data

    @asynccontextmanager
    async def stream(self, path: str, body: bytes) -> AsyncIterator[tuple[int, AsyncIterator[list[bytes]]]]:
        """(status, the body's lines in batches: all complete lines of one network read); each read
        waits at most `timeout`."""
        async with asyncio.timeout(self.timeout):
            resp, writer = await self._send(path, body)

        async def chunks() -> AsyncIterator[bytes]:
            it = resp.chunks()
            while True:
                try:
                    async with asyncio.timeout(self.timeout):
                        yield await it.__anext__()
                except StopAsyncIteration:
                    return
                except asyncio.IncompleteReadError as exc:
                    raise ConnectionError("upstream closed the connection mid-stream") from exc

        body_lines = line_batches(chunks())
        try:
            yield resp.status, body_lines
            # The caller may stop at `data: [DONE]`; read the body's end so the connection is reused.
            async with asyncio.timeout(1.0):
                async for _ in body_lines:
                    pass
        except TimeoutError:
            writer.close()
            return
        except BaseException:
            writer.close()
            raise
        self._release(resp, writer)

    async def aclose(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


class UpstreamEngine(Engine):
    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        api_key: str | None = None,
        tokenizer: Any = None,
        model_version: str = "upstream",
        timeout_s: float = 600.0,
        transport: httpx.AsyncBaseTransport | None = None,
        agent_models: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model_name = model
        self.agent_models = dict(agent_models or {})  # agent name -> upstream model name (e.g. a vLLM LoRA)
        self.api_key = api_key
        self.tokenizer = tokenizer
        self._version = model_version
        self._timeout = timeout_s
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        # httpx for tests' mock transports, https and proxies; the lean client for plain http.
        self._lean: _LeanHTTP | None = None
        if transport is None and _direct_http(self.base_url):
            headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
            self._lean = _LeanHTTP(self.base_url, headers, timeout_s)

    @property
    def model_version(self) -> str:
        return self._version

    def version_for(self, agent: str | None) -> str:
        served = self.agent_models.get(agent) if agent is not None else None
        return f"{self._version}:{served}" if served else self._version

    @property
    def agent_versions(self) -> dict[str, str]:
        return {agent: self.version_for(agent) for agent in self.agent_models}

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._client = httpx.AsyncClient(
                base_url=self.base_url, headers=headers, timeout=self._timeout, transport=self._transport
            )
        return self._client

    def _body(self, request: ChatRequest, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.agent_models.get(request.agent or "") or request.model or self.model_name,
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "n": request.n,
            "logprobs": True,
            "return_token_ids": True,  # vLLM extension; other servers ignore unknown fields
        }
        if request.tools:
            body["tools"] = request.tools
        if request.tool_choice is not None:
            body["tool_choice"] = request.tool_choice
        if request.stop:
            body["stop"] = request.stop
        if request.seed is not None:
            body["seed"] = request.seed
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def _post_json(self, body: dict[str, Any]) -> Any:
        if self._lean is not None:
            status, raw = await self._lean.post("/chat/completions", _dumps(body))
            if status >= 400:
                raise UpstreamStatusError(status, raw)
            return _loads(raw)
        resp = await self._http().post("/chat/completions", json=body)
        resp.raise_for_status()
        return resp.json()

    @asynccontextmanager
    async def _stream_lines(self, body: dict[str, Any]) -> AsyncIterator[AsyncIterator[list[bytes]]]:
        """The SSE body's lines, batched per network read (see `line_batches`)."""
        if self._lean is not None:
            async with self._lean.stream("/chat/completions", _dumps(body)) as (status, batches):
                if status >= 400:
                    raise UpstreamStatusError(status, b"\n".join([line async for batch in batches for line in batch]))
                yield batches
            return
        async with self._http().stream("POST", "/chat/completions", json=body) as resp:
            resp.raise_for_status()
            yield line_batches(resp.aiter_bytes())

    async def chat(self, request: ChatRequest) -> ChatResult:
        data = await self._post_json(self._body(request, stream=False))
        choices = [
            self._choice(
                index=c.get("index", i),
                message=c.get("message") or {},
                token_ids=c.get("token_ids"),
                logprobs=[t.get("logprob", 0.0) for t in ((c.get("logprobs") or {}).get("content") or [])],
                finish_reason=c.get("finish_reason"),
            )
            for i, c in enumerate(data.get("choices") or [])
        ]
        return self._result(request, data.get("prompt_token_ids"), choices)

    async def chat_stream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        if request.n != 1:
            raise ValueError("streaming supports n == 1 only")
        prompt_ids: list[int] | None = None
        token_ids: list[int] = []
        have_ids = False
        logprobs: list[float] = []
        text_parts: list[str] = []
        calls: dict[int, dict[str, str]] = {}
        finish: str | None = None
        tail_text: str = ""
        tail_ids: list[int] = []
        async with self._stream_lines(self._body(request, stream=True)) as batches:
            done = False
            async for batch in batches:
                # One delta per network read: what arrived together goes to the client together.
                new_text: list[str] = []
                new_ids: list[int] = []
                for line in batch:
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        break
                    chunk = _loads(payload)
                    if chunk.get("prompt_token_ids") is not None:
                        prompt_ids = chunk["prompt_token_ids"]
                    for c in chunk.get("choices") or []:
                        if c.get("prompt_token_ids") is not None:  # some vLLM versions put it on the choice
                            prompt_ids = c["prompt_token_ids"]
                        delta = c.get("delta") or {}
                        ids = c.get("token_ids") or []
                        have_ids = have_ids or c.get("token_ids") is not None
                        token_ids += ids
                        new_ids += ids
                        logprobs += [t.get("logprob", 0.0) for t in ((c.get("logprobs") or {}).get("content") or [])]
                        for tc in delta.get("tool_calls") or []:
                            slot = calls.setdefault(tc.get("index", 0), {"id": "", "name": "", "arguments": ""})
                            slot["id"] = tc.get("id") or slot["id"]
                            fn = tc.get("function") or {}
                            slot["name"] += fn.get("name") or ""
                            slot["arguments"] += fn.get("arguments") or ""
                        finish = c.get("finish_reason") or finish
                        content = delta.get("content") or ""
                        text_parts.append(content)
                        new_text.append(content)
                text = "".join(new_text)
                if done:  # the last text goes out with the final result, in one write
                    tail_text, tail_ids = text, new_ids
                    break
                if text or new_ids:
                    yield StreamDelta(index=0, text=text, token_ids=new_ids)
        message = {
            "content": "".join(text_parts),
            "tool_calls": [
                {"id": s["id"], "type": "function", "function": {"name": s["name"], "arguments": s["arguments"]}}
                for _, s in sorted(calls.items())
            ],
        }
        choice = self._choice(0, message, token_ids if have_ids else None, logprobs, finish)
        yield StreamDelta(index=0, text=tail_text, token_ids=tail_ids, final=self._result(request, prompt_ids, [choice]))

    def _choice(
        self,
        index: int,
        message: dict[str, Any],
        token_ids: list[int] | None,
        logprobs: list[float],
        finish_reason: str | None,
    ) -> ChatChoice:
        text = message.get("content") or ""
        tool_calls = [
            ToolCall(
                id=tc.get("id") or f"call_{index}_{j}",
                name=(tc.get("function") or {}).get("name", ""),
                arguments=(tc.get("function") or {}).get("arguments") or "{}",
            )
            for j, tc in enumerate(message.get("tool_calls") or [])
        ]
        if token_ids is not None:
            ids = list(token_ids)
            raw = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else text
        else:
            # Approximation: our rendering of what the model produced, re-tokenized locally.
            raw = "\n".join([text] * bool(text) + [format_tool_call(t.name, t.arguments) for t in tool_calls])
            ids = self._tokenize(raw)
        if len(logprobs) != len(ids):
            if logprobs:
                log.warning("upstream returned %d logprobs for %d token ids; dropping them", len(logprobs), len(ids))
            logprobs = []
        finish = "tool_calls" if tool_calls else _FINISH.get(finish_reason or "stop", "stop")
        return ChatChoice(
            index=index,
            text=text,
            raw_text=raw,
            tool_calls=tool_calls,
            finish_reason=finish,
            response_ids=ids,
            logprobs=logprobs,
        )

    def _tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None or not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _result(self, request: ChatRequest, prompt_ids: list[int] | None, choices: list[ChatChoice]) -> ChatResult:
        prompt_text = None
        if prompt_ids is None:
            if self.tokenizer is not None:
                rendered = render_prompt(self.tokenizer, request.messages, request.tools or None)
                prompt_ids, prompt_text = rendered.ids, rendered.text
            else:
                log.warning("upstream returned no prompt_token_ids and no local tokenizer is set")
                prompt_ids = []
        return ChatResult(
            prompt_ids=list(prompt_ids),
            prompt_text=prompt_text,
            choices=choices,
            model=self.model_name,
            model_version=self.version_for(request.agent),
        )

    async def close(self) -> None:
        if self._lean is not None:
            await self._lean.aclose()
        if self._client is not None:
            await self._client.aclose()
            self._client = None
