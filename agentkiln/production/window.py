"""Read production data from a store: the sessions with LLM calls since a time, and their feedback.

Separate from building the training sets (agentkiln/production/dataset.py), which is a pure
function of what is read here, so tests and other readers can feed it sessions from anywhere.
"""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

from agentkiln.models import Feedback, Rollout, RolloutMode, Span
from agentkiln.protocol import SpanNames
from agentkiln.store.base import Store

PAGE = 500
CONCURRENT_READS = 16  # sessions read at once (a server store: that many requests in flight)


class SessionData(NamedTuple):
    """One production session as read from the store: its calls in the window and its feedback."""

    rollout: Rollout
    calls: list[Span]
    feedback: list[Feedback]


async def _all_pages(fetch: Any) -> list[Any]:
    out: list[Any] = []
    offset = 0
    while True:
        page = await fetch(offset)
        out.extend(page)
        if len(page) < PAGE:
            return out
        offset += PAGE


async def _session(store: Store, rollout: Rollout, since: float) -> SessionData | None:
    rid = rollout.rollout_id
    spans = await _all_pages(lambda off: store.query_spans(rid, name=SpanNames.llm_call, limit=PAGE, offset=off))
    calls = sorted((s for s in spans if s.start_time >= since), key=lambda s: (s.sequence_id, s.start_time))
    if not calls:
        return None
    feedback = await _all_pages(lambda off: store.query_feedback(rollout_id=rid, limit=PAGE, offset=off))
    return SessionData(rollout, calls, feedback)


async def read_sessions(store: Store, since: float) -> list[SessionData]:
    """Production sessions with calls at or after `since`, oldest session first."""
    out: list[SessionData] = []
    offset = 0
    gate = asyncio.Semaphore(CONCURRENT_READS)

    async def one(rollout: Rollout) -> SessionData | None:
        async with gate:
            return await _session(store, rollout, since)

    while True:
        page = await store.query_rollouts(mode=RolloutMode.production, limit=PAGE, offset=offset)
        found = await asyncio.gather(*(one(r) for r in page))
        out.extend(s for s in found if s is not None)
        if len(page) < PAGE:
            return out
        offset += PAGE
