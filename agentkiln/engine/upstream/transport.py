"""HTTP to the upstream server, with every failure turned into the engine error family.

aiohttp serves real upstreams (http, https, an HTTP(S)_PROXY from the environment) on the
gateway's hot path: against bench/mock_openai.py an aiohttp POST took 0.37 ms p50 where an httpx
AsyncClient took 1.65 ms (its anyio/httpcore layers). It still costs a few hundred microseconds of
CPU more than the hand-written client it replaced, the price of real HTTP/TLS/proxy support.
httpx is used only when a caller injects an `httpx.AsyncBaseTransport` (tests' MockTransport, an
in-process ASGI app).

Mapping (see agentkiln/engine/errors.py): 429, 503, refused/reset connections, timeouts ->
`EngineUnavailable` (Retry-After honoured); other 4xx -> `EngineRequestError`; other 5xx and
bodies that are not JSON -> `EngineResponseError`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx
import orjson
from yarl import URL

from agentkiln.engine.errors import EngineError, EngineRequestError, EngineResponseError, EngineUnavailable
from agentkiln.engine.upstream.sse import line_batches

log = logging.getLogger(__name__)

_EXCERPT = 300  # characters of an upstream error body kept in the exception message
_DRAIN_S = 1.0  # how long to read a stream's tail after [DONE] so its connection can be reused
_USER_AGENT = "agentkiln"


def dumps(body: dict[str, Any]) -> bytes:
    """A request body as JSON bytes (orjson, or json for what orjson cannot encode)."""
    try:
        return orjson.dumps(body)
    except TypeError:
        return json.dumps(body).encode()


def loads(raw: bytes) -> Any:
    """Parse an upstream JSON body; orjson is several times faster on this per-token path.

    json accepts what orjson refuses (NaN / Infinity literals some servers write for logprobs).
    Anything neither accepts is the upstream's fault: `EngineResponseError`.
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            return json.loads(raw)
        except ValueError:
            raise EngineResponseError(f"upstream answered malformed JSON: {_excerpt(raw)}") from None


def _excerpt(body: bytes) -> str:
    text = " ".join(body[: 4 * _EXCERPT].decode("utf-8", "replace").split())
    return text if len(text) <= _EXCERPT else text[:_EXCERPT] + "..."


def retry_after_s(value: str | None, default: float = 1.0) -> float:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), else `default`."""
    if not value:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return default


def status_error(status: int, headers: Mapping[str, str], body: bytes) -> EngineError:
    """The family member for an upstream HTTP error status."""
    message = f"upstream answered HTTP {status}: {_excerpt(body)}"
    if status in (429, 503):
        return EngineUnavailable(
            message, retry_after_s=retry_after_s(headers.get("retry-after")), upstream_status=status
        )
    if 400 <= status < 500:
        return EngineRequestError(message, upstream_status=status)
    return EngineResponseError(message, upstream_status=status)


def env_proxy(base_url: str) -> str | None:
    """The proxy the environment names for this URL (HTTP(S)_PROXY / ALL_PROXY, minus NO_PROXY).

    Resolved once: aiohttp's own `trust_env` re-reads the environment and ~/.netrc in a thread
    on every request, which would cost more than the rest of the request.
    """
    parts = urlsplit(base_url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or (parts.hostname and urllib.request.proxy_bypass(parts.hostname)):
        return None
    return proxy


def _aiohttp_error(exc: BaseException, timeout_s: float) -> EngineError:
    if isinstance(exc, EngineError):
        return exc
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):  # retrying will not fix a certificate
        return EngineResponseError(f"upstream TLS certificate rejected: {exc}")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):  # aiohttp's timeouts subclass these too
        return EngineUnavailable(f"upstream timed out (limit {timeout_s:g}s): {type(exc).__name__}")
    if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError)):
        return EngineUnavailable(f"upstream unreachable or connection lost: {type(exc).__name__}: {exc}")
    return EngineResponseError(f"upstream HTTP exchange failed: {type(exc).__name__}: {exc}")


def _httpx_error(exc: BaseException, timeout_s: float) -> EngineError:
    if isinstance(exc, EngineError):
        return exc
    if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
        return EngineUnavailable(f"upstream timed out (limit {timeout_s:g}s): {type(exc).__name__}")
    if isinstance(exc, (httpx.NetworkError, httpx.RemoteProtocolError, ConnectionError)):
        return EngineUnavailable(f"upstream unreachable or connection lost: {type(exc).__name__}: {exc}")
    return EngineResponseError(f"upstream HTTP exchange failed: {type(exc).__name__}: {exc}")


_AIOHTTP_ERRORS = (aiohttp.ClientError, OSError, TimeoutError, asyncio.TimeoutError)
_HTTPX_ERRORS = (httpx.HTTPError, OSError, TimeoutError)


class AiohttpTransport:
    """Keep-alive pooled POSTs with aiohttp; unlimited connections, as concurrent calls need them.

    An upstream batches whatever is in flight (vLLM wants all of them), so the pool never queues
    requests. A request whose kept-alive connection the server dropped before answering is sent
    once more (aiohttp retries only idempotent methods by itself).
    """

    def __init__(self, base_url: str, headers: Mapping[str, str], timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        # A User-Agent of our own keeps aiohttp on its fast header path (a skip list is rebuilt per request).
        self._headers = {"content-type": "application/json", "user-agent": _USER_AGENT, **headers}
        self._proxy = env_proxy(self.base_url)
        self._whole = aiohttp.ClientTimeout(total=timeout_s, connect=timeout_s)
        self._per_read = aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_read=timeout_s)
        self._urls: dict[str, URL] = {}
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use: a session belongs to the event loop it was made in.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
                headers=self._headers,
                proxy=self._proxy,
                # Calls of every agent share this session: no upstream cookie may follow one call into another.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def _open(self, path: str, body: bytes, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
        url = self._urls.get(path) or self._urls.setdefault(path, URL(self.base_url + path))
        try:
            return await self._client().post(url, data=body, timeout=timeout)
        except aiohttp.ServerDisconnectedError:
            log.debug("upstream dropped a kept-alive connection before answering; sending once more")
            return await self._client().post(url, data=body, timeout=timeout)

    async def post_json(self, path: str, body: bytes) -> Any:
        """POST `body`, return the parsed JSON answer; the whole exchange takes at most `timeout_s`."""
        try:
            async with await self._open(path, body, self._whole) as resp:
                raw = await resp.read()
        except _AIOHTTP_ERRORS as exc:
            raise _aiohttp_error(exc, self.timeout_s) from exc
        if resp.status >= 400:
            raise status_error(resp.status, resp.headers, raw)
        return loads(raw)

    @asynccontextmanager
    async def stream(self, path: str, body: bytes) -> AsyncIterator[AsyncIterator[list[bytes]]]:
        """The answer's lines, batched per network read; each read waits at most `timeout_s`."""
        try:
            async with await self._open(path, body, self._per_read) as resp:
                if resp.status >= 400:
                    raise status_error(resp.status, resp.headers, await resp.read())
                batches = line_batches(resp.content.iter_any())
                yield batches
                # The caller may stop at `data: [DONE]`; read the body's end so the connection is reused.
                # Usually that end came in the same read: then there is nothing to wait for (or time).
                if not resp.content.at_eof():
                    try:
                        async with asyncio.timeout(_DRAIN_S):
                            async for _ in batches:
                                pass
                    except TimeoutError:
                        resp.close()
                await batches.aclose()
        except _AIOHTTP_ERRORS as exc:
            raise _aiohttp_error(exc, self.timeout_s) from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class HttpxTransport:
    """The same interface over httpx, for an injected `httpx.AsyncBaseTransport`."""

    def __init__(
        self, base_url: str, headers: Mapping[str, str], timeout_s: float, transport: httpx.AsyncBaseTransport
    ) -> None:
        self.timeout_s = timeout_s
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"content-type": "application/json", **headers},
            timeout=timeout_s,
            transport=transport,
        )

    async def post_json(self, path: str, body: bytes) -> Any:
        try:
            resp = await self._client.post(path, content=body)
        except _HTTPX_ERRORS as exc:
            raise _httpx_error(exc, self.timeout_s) from exc
        if resp.status_code >= 400:
            raise status_error(resp.status_code, resp.headers, resp.content)
        return loads(resp.content)

    @asynccontextmanager
    async def stream(self, path: str, body: bytes) -> AsyncIterator[AsyncIterator[list[bytes]]]:
        try:
            async with self._client.stream("POST", path, content=body) as resp:
                if resp.status_code >= 400:
                    raise status_error(resp.status_code, resp.headers, await resp.aread())
                yield line_batches(resp.aiter_bytes())
        except _HTTPX_ERRORS as exc:
            raise _httpx_error(exc, self.timeout_s) from exc

    async def aclose(self) -> None:
        await self._client.aclose()
