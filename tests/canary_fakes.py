"""Stores and records for canary tests (not a test module).

`canary_store()` is the real InMemoryStore once it implements sessions, feedback and canaries;
until then a small subclass that keeps them in dicts with the interface's rules (one active
canary, one decider wins, feedback resolved to the rated call's rollout and model version).
`rate()` records rated calls through the public store interface either way.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from agentkiln.models import (
    AttemptedRollout,
    Canary,
    CanaryDecision,
    CanaryIn,
    CanaryStatus,
    Feedback,
    FeedbackIn,
    LLMEndpoint,
    Resources,
    ResourcesIn,
    RolloutMode,
    SpanIn,
    new_id,
    now,
)
from agentkiln.protocol import SpanAttrs, SpanNames
from agentkiln.store.base import InvalidTransitionError, NotFoundError, Store
from agentkiln.store.memory import InMemoryStore


class FallbackCanaryStore(InMemoryStore):
    """InMemoryStore plus the production records, for as long as the memory store lacks them."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._sessions: dict[str, AttemptedRollout] = {}
        self._fb: list[Feedback] = []
        self._can: dict[str, Canary] = {}

    async def open_session(self, session_id: str, *, metadata: dict[str, Any] | None = None) -> AttemptedRollout:
        if session_id not in self._sessions:
            self._sessions[session_id] = await self.start_rollout(
                {"session_id": session_id}, mode=RolloutMode.production, metadata=metadata
            )
        return self._sessions[session_id]

    async def add_feedback(self, feedback: FeedbackIn) -> Feedback:
        rollout_id = attempt_id = span_id = version = None
        if feedback.response_id is not None:
            for ar in self._sessions.values():
                for span in await self.query_spans(ar.rollout.rollout_id):
                    if span.attributes.get(SpanAttrs.call_id) == feedback.response_id:
                        rollout_id, attempt_id, span_id = span.rollout_id, span.attempt_id, span.span_id
                        version = span.attributes.get(SpanAttrs.model_version)
            if rollout_id is None:
                raise NotFoundError(f"no recorded LLM call with response id {feedback.response_id!r}")
        elif feedback.session_id is not None:
            if feedback.session_id not in self._sessions:
                raise NotFoundError(f"no recorded session {feedback.session_id!r}")
            rollout_id = self._sessions[feedback.session_id].rollout.rollout_id
        stored = Feedback.model_validate(
            {
                **feedback.model_dump(),
                "rollout_id": rollout_id,
                "feedback_id": new_id("fb"),
                "attempt_id": attempt_id,
                "resolved_span_id": span_id,
                "model_version": version,
            }
        )
        self._fb.append(stored)
        return stored.model_copy(deep=True)

    async def query_feedback(self, *, session_id=None, rollout_id=None, response_id=None, since=None, limit=1_000,
                             offset=0) -> list[Feedback]:  # fmt: skip
        out = [fb for fb in self._fb if since is None or fb.created_at >= since]
        return [fb.model_copy(deep=True) for fb in out[offset : offset + limit]]

    async def get_latest_resources(self) -> Resources | None:
        deployed = [r for r in await self.query_resources(limit=10_000) if not r.candidate]
        return deployed[-1] if deployed else None

    async def start_canary(self, canary: CanaryIn) -> Canary:
        if await self.get_active_canary() is not None:
            raise InvalidTransitionError("a canary is active")
        await self.get_resources(canary.candidate_resources_id)
        baseline = (
            await self.get_resources(canary.baseline_resources_id)
            if canary.baseline_resources_id
            else await self.get_latest_resources()
        )
        if baseline is None:
            raise NotFoundError("no deployed resources")
        made = Canary.model_validate(
            {
                **canary.model_dump(),
                "canary_id": new_id("can"),
                "baseline_resources_id": baseline.resources_id,
                "decisions": [CanaryDecision(action="start", by="user")],
            }
        )
        self._can[made.canary_id] = made
        return made.model_copy(deep=True)

    async def get_canary(self, canary_id: str) -> Canary:
        if canary_id not in self._can:
            raise NotFoundError(f"canary {canary_id} not found")
        return self._can[canary_id].model_copy(deep=True)

    async def get_active_canary(self) -> Canary | None:
        return next((c.model_copy(deep=True) for c in self._can.values() if c.status == CanaryStatus.active), None)

    async def query_canaries(self, *, limit: int = 100, offset: int = 0) -> list[Canary]:
        return [c.model_copy(deep=True) for c in list(reversed(self._can.values()))[offset : offset + limit]]

    async def decide_canary(self, canary_id: str, decision: CanaryDecision, *, promoted_resources_id=None) -> Canary:
        canary = await self.get_canary(canary_id)
        if canary.status != CanaryStatus.active:
            raise InvalidTransitionError(f"canary {canary_id} is already {canary.status.value}")
        status = CanaryStatus.promoted if decision.action == "promote" else CanaryStatus.rolled_back
        self._can[canary_id] = canary.model_copy(update={
            "status": status, "ended_at": now(), "promoted_resources_id": promoted_resources_id,
            "decisions": [*canary.decisions, decision]})  # fmt: skip
        return self._can[canary_id].model_copy(deep=True)


def memory_store_has_canaries() -> bool:
    if os.environ.get("KILN_TEST_CANARY_FALLBACK"):  # run the canary tests against the fallback anyway
        return False
    return (
        InMemoryStore.decide_canary is not Store.decide_canary and InMemoryStore.open_session is not Store.open_session
    )


def store_class() -> type[InMemoryStore]:
    return InMemoryStore if memory_store_has_canaries() else FallbackCanaryStore


def canary_store() -> InMemoryStore:
    return store_class()(sweep_interval_s=None)


def slowed(cls: type[InMemoryStore], delay_s: float = 0.02) -> type[InMemoryStore]:
    """`cls` whose feedback reads yield to the loop, so concurrent deciders really interleave."""

    class Slowed(cls):  # type: ignore[valid-type, misc]
        async def query_feedback(self, **kwargs: Any) -> list[Feedback]:
            await asyncio.sleep(delay_s)
            return await super().query_feedback(**kwargs)

    return Slowed


# --------------------------------------------------------------------------- records


async def publish(store: Store, name: str, *, candidate: bool = False) -> Resources:
    return await store.add_resources(
        ResourcesIn(
            llms={"main": LLMEndpoint(model="tiny", adapter_path=f"runs/{name}")},
            candidate=candidate,
            metadata={"name": name},
        )
    )


async def versions(store: Store) -> tuple[Resources, Resources]:
    """A deployed baseline and a candidate (candidate published last)."""
    return await publish(store, "base"), await publish(store, "cand", candidate=True)


_calls = 0


async def rate(store: Store, session: str, version: str | None, *values: Any, name: str = "user") -> None:
    """Record one LLM call of `session` served by `version` per value, and rate that call with the value."""
    global _calls
    ar = await store.open_session(session)
    for value in values:
        _calls += 1
        response_id = f"chatcmpl-{_calls}"
        attrs: dict[str, Any] = {
            SpanAttrs.call_id: response_id,
            SpanAttrs.choice_index: 0,
            SpanAttrs.session_id: session,
        }
        if version is not None:
            attrs[SpanAttrs.model_version] = version
        await store.add_spans([SpanIn(rollout_id=ar.rollout.rollout_id, attempt_id=ar.attempt.attempt_id,
                                      name=SpanNames.llm_call, attributes=attrs)])  # fmt: skip
        await store.add_feedback(FeedbackIn(response_id=response_id, name=name, value=value))


async def rate_sessions(store: Store, prefix: str, version: str, values: list[Any]) -> None:
    """One rated session per value."""
    for i, value in enumerate(values):
        await rate(store, f"{prefix}-{i}", version, value)
