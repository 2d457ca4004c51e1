"""Replay of recent answers to retried writes, keyed by the client's `Idempotency-Key` header.

The HTTP client retries a write when the answer is lost (connection reset, timeout). Without
this, a retried enqueue makes two rollouts and a retried dequeue hands out a second rollout
while the first sits "running" until it times out. The server remembers the answer to each
keyed write for a while and sends the same answer again; a retry that arrives while the
first request is still running waits for it. Where the answers live is an IdempotencyCache
(store/idempotency.py): this process's memory for one server (a retry that reaches a restarted
server runs again), or the store's database when replicas share it (PostgreSQL). Spans get a second guard keyed by their own ids (RecentSpans),
which also covers senders that send no key, such as OpenTelemetry exporters.

Both memories are bounded by approximate bytes (what they hold, plus a fixed cost per entry)
as well as by entries, least recently used out first: an entry count alone let a few thousand
4 MB answers, or spans with megabytes of attributes, hold gigabytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Generic, Hashable, Sequence, TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentkiln.models import Span, SpanIn
from agentkiln.protocol import Headers
from agentkiln.server.errors import send_error
from agentkiln.store.base import Store
from agentkiln.store.idempotency import IdempotencyBusy, IdempotencyCache, IdempotencyKey, StoredAnswer

log = logging.getLogger(__name__)

HEADER = Headers.idempotency_key.encode()
_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_MAX_CACHED_BODY = 4_000_000
# What one entry costs beyond its payload: the OrderedDict node, the key tuple and its strings'
# headers, the value's object header (measured with tracemalloc, rounded up).
ENTRY_OVERHEAD = 512
DEFAULT_MAX_BYTES = 64 * 2**20

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """A mapping of at most `max_bytes` (approximate, as the caller sizes values) and `max_entries`."""

    def __init__(self, max_bytes: int, max_entries: int) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.nbytes = 0
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def get(self, key: K) -> V | None:
        """The value (now the most recently used), or None."""
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def pop(self, key: K) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.nbytes -= item[1]

    def put(self, key: K, value: V, size: int) -> bool:
        """Remember value (size: its payload bytes); False, and nothing kept, if it alone is over the bound."""
        self.pop(key)
        size += ENTRY_OVERHEAD
        if size > self.max_bytes:
            return False
        self._items[key] = (value, size)
        self.nbytes += size
        while self.nbytes > self.max_bytes or len(self._items) > self.max_entries:
            _, (_, evicted) = self._items.popitem(last=False)
            self.nbytes -= evicted
        return True


@dataclass
class _Capture:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    complete: bool = False

    def answer(self) -> StoredAnswer | None:
        """What a retry may be given: a complete answer that is no server error and not too big."""
        if not self.complete or self.status >= 500 or self.size > _MAX_CACHED_BODY:
            return None
        return StoredAnswer(self.status, self.headers, b"".join(self.chunks))


class MemoryIdempotencyCache:
    """Answers in this process (one server): ttl_s, within max_bytes and max_entries, LRU out first."""

    def __init__(self, *, max_entries: int = 10_000, max_bytes: int = DEFAULT_MAX_BYTES, ttl_s: float = 600.0) -> None:
        self.ttl_s = ttl_s
        self.answers: ByteLRU[IdempotencyKey, tuple[StoredAnswer, float]] = ByteLRU(max_bytes, max_entries)
        self._inflight: dict[IdempotencyKey, asyncio.Event] = {}

    async def begin(self, key: IdempotencyKey) -> StoredAnswer | None:
        while (pending := self._inflight.get(key)) is not None:
            await pending.wait()
        item = self.answers.get(key)
        if item is not None and item[1] >= time.monotonic():
            return item[0]
        if item is not None:
            self.answers.pop(key)
        self._inflight[key] = asyncio.Event()
        return None

    async def finish(self, key: IdempotencyKey, answer: StoredAnswer | None) -> None:
        if answer is not None:
            self.answers.put(key, (answer, time.monotonic() + self.ttl_s), answer.nbytes() + key.nbytes())
        self._inflight.pop(key).set()


class IdempotencyMiddleware:
    """Replays answers to keyed writes from `cache` (default: this process's memory, see MemoryIdempotencyCache)."""

    def __init__(self, app: ASGIApp, *, cache: IdempotencyCache | None = None, **memory: Any) -> None:
        self.app = app
        self.cache: IdempotencyCache = cache if cache is not None else MemoryIdempotencyCache(**memory)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        idem = None
        if scope["type"] == "http" and scope.get("method") in _WRITE_METHODS:
            idem = next((v for k, v in scope.get("headers", ()) if k == HEADER), None)
        if not idem:
            await self.app(scope, receive, send)
            return
        key = IdempotencyKey(scope["method"], scope["path"], idem)
        try:
            answer = await self.cache.begin(key)
        except IdempotencyBusy as exc:
            await send_error(send, 503, "IdempotencyBusy", str(exc), [(b"retry-after", b"1")])
            return
        if answer is not None:
            log.info("replaying answer to retried %s %s", scope["method"], scope["path"])
            await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers})
            await send({"type": "http.response.body", "body": answer.body})
            return

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
            await asyncio.shield(self.cache.finish(key, capture.answer()))


class RecentSpans:
    """Spans this server stored lately, by (rollout_id, attempt_id, span_id), so a re-sent span is not stored twice.

    Covers senders without an Idempotency-Key (OTLP exporters retry whole batches) and
    repeats inside one batch. Per process, within max_bytes (64 MiB: some 100k typical spans,
    minutes of traffic, longer than exporters retry) and max_entries; the store is the final
    guard. Spans are kept as their JSON, which is both compact and exactly measurable.
    """

    def __init__(self, max_entries: int = 200_000, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.spans: ByteLRU[tuple[str, str, str], bytes] = ByteLRU(max_bytes, max_entries)

    async def add(self, store: Store, spans: Sequence[SpanIn]) -> list[Span]:
        """Like store.add_spans, but known spans come back as first stored instead of being added again."""
        keys = [(s.rollout_id, s.attempt_id, s.span_id) for s in spans]
        by_key: dict[tuple[str, str, str], Span] = {}
        fresh: dict[tuple[str, str, str], SpanIn] = {}
        for key, span in zip(keys, spans):
            if key in by_key or key in fresh:
                continue
            known = self.spans.get(key)
            if known is not None:  # read now: storing this batch may evict it
                by_key[key] = Span.model_validate_json(known)
            else:
                fresh[key] = span
        if len(fresh) < len(spans):
            log.info("ignoring %d re-sent span(s)", len(spans) - len(fresh))
        stored = await store.add_spans(list(fresh.values())) if fresh else []
        for key, span in zip(fresh, stored):
            raw = span.model_dump_json().encode()
            self.spans.put(key, raw, len(raw) + sum(map(len, key)))
            by_key[key] = span
        return [by_key[key] for key in keys]
