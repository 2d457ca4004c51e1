"""Replay of recent answers to retried writes, keyed by the client's `Idempotency-Key` header.

The HTTP client retries a write when the answer is lost (connection reset, timeout). Without
this, a retried enqueue makes two rollouts and a retried dequeue hands out a second rollout
while the first sits "running" until it times out. The server remembers the answer to each
keyed write for a while and sends the same answer again; a retry that arrives while the
first request is still running waits for it. The memory is per process: a retry that reaches
a restarted server runs again. Spans get a second guard keyed by their own ids (RecentSpans),
which also covers senders that send no key, such as OpenTelemetry exporters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentkiln.models import Span, SpanIn
from agentkiln.protocol import Headers
from agentkiln.store.base import Store

log = logging.getLogger(__name__)

HEADER = Headers.idempotency_key.encode()
_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_MAX_CACHED_BODY = 4_000_000


@dataclass
class _Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    expires: float


@dataclass
class _Capture:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    complete: bool = False


class IdempotencyMiddleware:
    def __init__(self, app: ASGIApp, *, max_entries: int = 10_000, ttl_s: float = 600.0) -> None:
        self.app = app
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._answers: OrderedDict[tuple[str, str, bytes], _Answer] = OrderedDict()
        self._inflight: dict[tuple[str, str, bytes], asyncio.Event] = {}

    def _lookup(self, key: tuple[str, str, bytes]) -> _Answer | None:
        answer = self._answers.get(key)
        if answer is None:
            return None
        if answer.expires < time.monotonic():
            del self._answers[key]
            return None
        return answer

    def _remember(self, key: tuple[str, str, bytes], capture: _Capture) -> None:
        if not capture.complete or capture.status >= 500 or capture.size > _MAX_CACHED_BODY:
            return
        self._answers[key] = _Answer(
            capture.status, capture.headers, b"".join(capture.chunks), time.monotonic() + self.ttl_s
        )
        while len(self._answers) > self.max_entries:
            self._answers.popitem(last=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        idem = None
        if scope["type"] == "http" and scope.get("method") in _WRITE_METHODS:
            idem = next((v for k, v in scope.get("headers", ()) if k == HEADER), None)
        if not idem:
            await self.app(scope, receive, send)
            return
        key = (scope["method"], scope["path"], idem)
        while (pending := self._inflight.get(key)) is not None:
            await pending.wait()
        answer = self._lookup(key)
        if answer is not None:
            log.info("replaying answer to retried %s %s", scope["method"], scope["path"])
            await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers})
            await send({"type": "http.response.body", "body": answer.body})
            return

        event = asyncio.Event()
        self._inflight[key] = event
        capture = _Capture()

        async def capturing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                capture.status = message["status"]
                capture.headers = list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                capture.size += len(body)
                if capture.size <= _MAX_CACHED_BODY:
                    capture.chunks.append(body)
                if not message.get("more_body", False):
                    capture.complete = True
            await send(message)

        try:
            await self.app(scope, receive, capturing_send)
        finally:
            # Remembered even when sending failed: a lost answer is exactly what retries recover.
            self._remember(key, capture)
            del self._inflight[key]
            event.set()


class RecentSpans:
    """Spans this server stored lately, by (rollout_id, attempt_id, span_id), so a re-sent span is not stored twice.

    Covers senders without an Idempotency-Key (OTLP exporters retry whole batches) and
    repeats inside one batch. Bounded and per process; the store is the final guard.
    """

    def __init__(self, max_entries: int = 200_000) -> None:
        self.max_entries = max_entries
        self._spans: OrderedDict[tuple[str, str, str], Span] = OrderedDict()

    async def add(self, store: Store, spans: Sequence[SpanIn]) -> list[Span]:
        """Like store.add_spans, but known spans come back as first stored instead of being added again."""
        keys = [(s.rollout_id, s.attempt_id, s.span_id) for s in spans]
        fresh: dict[tuple[str, str, str], SpanIn] = {}
        for key, span in zip(keys, spans):
            if key not in self._spans and key not in fresh:
                fresh[key] = span
        if len(fresh) < len(spans):
            log.info("ignoring %d re-sent span(s)", len(spans) - len(fresh))
        stored = await store.add_spans(list(fresh.values())) if fresh else []
        for key, span in zip(fresh, stored):
            self._spans[key] = span
        while len(self._spans) > self.max_entries:
            self._spans.popitem(last=False)
        by_key = dict(zip(fresh, stored))
        return [by_key.get(key) or self._spans[key] for key in keys]
