"""The server's per-process memories (idempotent answers, recent spans) stay within their byte bounds."""

from __future__ import annotations

import gc
import tracemalloc
from types import SimpleNamespace
from typing import Any

import pytest

from agentkiln.models import Span
from agentkiln.server.idempotency import ENTRY_OVERHEAD, ByteLRU, IdempotencyMiddleware, RecentSpans

BOUND = 2 * 2**20  # small, so that 100k items overflow it many times


def _stored(i: int) -> Span:
    return Span(
        rollout_id=f"ro-{i:016x}",
        attempt_id=f"at-{i:016x}",
        name="kiln.llm.call",
        span_id=f"{i:016x}",
        attributes={"kiln.llm.prompt": "p" * (i * 7 % 700), "gen_ai.usage.input_tokens": i},
        sequence_id=i + 1,
    )


_TEMPLATES = [_stored(i) for i in range(1_000)]


class _CountingStore:
    """Stores nothing and answers with ready-made spans: only the cache under test keeps memory."""

    def __init__(self) -> None:
        self.added = 0

    async def add_spans(self, spans: list[Any]) -> list[Span]:
        start, self.added = self.added, self.added + len(spans)
        return [_TEMPLATES[i % len(_TEMPLATES)] for i in range(start, self.added)]


def _span(i: int) -> Any:
    """What RecentSpans reads of a SpanIn (the key), without pydantic's cost per object."""
    return SimpleNamespace(rollout_id=f"ro-{i // 100:016x}", attempt_id=f"at-{i // 100:016x}", span_id=f"{i:016x}")


async def test_recent_spans_stay_under_their_bound_after_100k_spans() -> None:
    recent = RecentSpans(max_bytes=BOUND)
    store = _CountingStore()
    await recent.add(store, [_span(i) for i in range(-1000, 0)])  # warm-up
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for start in range(0, 100_000, 1_000):
            await recent.add(store, [_span(i) for i in range(start, start + 1_000)])
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert store.added == 101_000
    assert 0 < recent.spans.nbytes <= BOUND
    assert len(recent.spans) < 100_000  # it evicted
    # The accounting is not optimistic: what the process really kept is within the bound too.
    assert grown <= BOUND, f"{grown} bytes retained for a {BOUND}-byte bound"


async def test_recent_spans_still_replay_after_eviction_within_one_batch() -> None:
    recent = RecentSpans(max_bytes=20_000)
    store = _CountingStore()
    first = await recent.add(store, [_span(0)])
    # A batch far over the bound that also re-sends span 0: it is answered from memory, not stored again.
    again = await recent.add(store, [_span(0)] + [_span(i) for i in range(1, 500)])
    assert again[0] == first[0]
    assert store.added == 500
    assert recent.spans.nbytes <= 20_000


async def _answer(scope: dict, receive: Any, send: Any) -> None:
    body = b"x" * 1_000
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


async def _noop_send(message: dict) -> None:
    pass


async def _receive() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}


async def test_idempotency_answers_stay_under_their_bound_after_100k_writes() -> None:
    middleware = IdempotencyMiddleware(_answer, max_bytes=BOUND, max_entries=1_000_000)
    for i in range(100_000):
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/api/v1/rollouts",
            "headers": [(b"idempotency-key", b"k-%d" % i)],
        }
        await middleware(scope, _receive, _noop_send)
    answers = middleware.cache.answers  # the in-process cache (no shared store here)
    assert 0 < answers.nbytes <= BOUND
    assert len(answers) < 100_000


def test_byte_lru_evicts_least_recently_used_and_refuses_oversized_values() -> None:
    lru: ByteLRU[str, bytes] = ByteLRU(max_bytes=3 * (100 + ENTRY_OVERHEAD), max_entries=10)
    for key in "abc":
        assert lru.put(key, b"v", 100)
    assert lru.get("a") == b"v"  # a is now the most recent: b goes first
    lru.put("d", b"v", 100)
    assert [k for k in "abcd" if k in lru] == ["a", "c", "d"]
    assert not lru.put("huge", b"v", 10_000) and "huge" not in lru
    assert lru.nbytes <= lru.max_bytes


@pytest.mark.parametrize("entries", [1, 5])
def test_byte_lru_entry_bound(entries: int) -> None:
    lru: ByteLRU[int, int] = ByteLRU(max_bytes=10**9, max_entries=entries)
    for i in range(20):
        lru.put(i, i, 8)
    assert len(lru) == entries and lru.get(19) == 19
