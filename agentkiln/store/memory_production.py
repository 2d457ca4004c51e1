"""The in-process store's production records: sessions, feedback, canaries (learning from use).

A mixin of `InMemoryStore`, on its dicts and lock; the rules come from `production_rules`, shared
with the database backends.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agentkiln.models import (
    Attempt,
    AttemptedRollout,
    Canary,
    CanaryDecision,
    CanaryIn,
    CanaryStatus,
    Feedback,
    FeedbackIn,
    Resources,
    Rollout,
    RolloutMode,
    Span,
)
from agentkiln.models import now as wall_now
from agentkiln.protocol import SpanAttrs, SpanNames
from agentkiln.store import lifecycle, production_rules
from agentkiln.store.base import NotFoundError


class MemoryProduction:
    """Sessions, feedback and canaries on InMemoryStore's state (see base.Store for the contract)."""

    _lock: asyncio.Lock
    _rollouts: dict[str, Rollout]
    _order: dict[str, int]
    _running: set[str]
    _attempts: dict[str, list[Attempt]]
    _attempt_pos: dict[tuple[str, str], int]
    _spans: dict[tuple[str, str], list[Span]]
    _span_keys: dict[tuple[str, str, str], Span]
    _resources: list[Resources]
    _resources_by_id: dict[str, Resources]
    _calls: dict[str, list[tuple[int, int, production_rules.CallEntry]]]
    _feedback: dict[str, Feedback]
    _feedback_by_client: dict[str, Feedback]
    _canaries: dict[str, Canary]
    _add: Any  # InMemoryStore's: a new rollout into the indexes

    # ------------------------------------------------------------------ production (learning from use)

    async def open_session(self, session_id: str, *, metadata: dict[str, Any] | None = None) -> AttemptedRollout:
        rollout, attempt = production_rules.new_session(session_id, metadata, wall_now())
        async with self._lock:
            if rollout.rollout_id not in self._rollouts:
                self._add(rollout)
                self._attempts[rollout.rollout_id] = [attempt]
                self._attempt_pos[(rollout.rollout_id, attempt.attempt_id)] = 0
            stored = self._rollouts[rollout.rollout_id]
            attempts = self._attempts.get(rollout.rollout_id) or [attempt]
            return AttemptedRollout(rollout=stored.model_copy(deep=True), attempt=attempts[-1].model_copy())

    def _session_version(self, rollout_id: str) -> str | None:
        """The model version of the session's latest recorded call."""
        for attempt in reversed(self._attempts.get(rollout_id, [])):
            for span in reversed(self._spans.get((rollout_id, attempt.attempt_id), [])):
                if span.name == SpanNames.llm_call:
                    version = span.attributes.get(SpanAttrs.model_version)
                    return None if version is None else str(version)
        return None

    def _resolve(self, feedback: FeedbackIn) -> production_rules.Target:
        if feedback.response_id is not None:
            entries = [e for e in self._calls.get(feedback.response_id, [])
                       if feedback.rollout_id is None or e[2].rollout_id == feedback.rollout_id]  # fmt: skip
            return production_rules.target_of_call(feedback, min(entries)[2] if entries else None)
        if feedback.session_id is not None:
            rid = production_rules.session_of(feedback)
            rollout = self._rollouts.get(rid) if rid is not None else None
            version = self._session_version(rid) if rollout is not None else None
            return production_rules.target_of_session(feedback, rollout, version)
        assert feedback.rollout_id is not None and feedback.span_id is not None
        for attempt in self._attempts.get(feedback.rollout_id, []):
            span = self._span_keys.get((feedback.rollout_id, attempt.attempt_id, feedback.span_id))
            if span is not None:
                return production_rules.target_of_span(feedback, attempt.attempt_id, span.attributes)
        return production_rules.target_of_span(feedback, None, None)

    async def add_feedback(self, feedback: FeedbackIn) -> Feedback:
        async with self._lock:
            if feedback.client_id is not None and feedback.client_id in self._feedback_by_client:
                return self._feedback_by_client[feedback.client_id].model_copy(deep=True)
            stored = production_rules.new_feedback(feedback, self._resolve(feedback), wall_now())
            self._feedback[stored.feedback_id] = stored
            if stored.client_id is not None:
                self._feedback_by_client[stored.client_id] = stored
            return stored.model_copy(deep=True)

    async def query_feedback(
        self,
        *,
        session_id: str | None = None,
        rollout_id: str | None = None,
        response_id: str | None = None,
        since: float | None = None,
        limit: int = 1_000,
        offset: int = 0,
    ) -> list[Feedback]:
        lifecycle.check_page(limit, offset)
        rid, possible = production_rules.feedback_filter(session_id=session_id, rollout_id=rollout_id)
        if not possible:
            return []
        async with self._lock:
            out = [fb for fb in self._feedback.values()
                   if production_rules.feedback_matches(fb, rollout_id=rid, response_id=response_id, since=since)]  # fmt: skip
            return [fb.model_copy(deep=True) for fb in out[offset : offset + limit]]

    def _last_active(self, rollout: Rollout) -> float:
        times = [rollout.created_at]
        for attempt in self._attempts.get(rollout.rollout_id, []):
            times.append(attempt.last_heartbeat)
            for span in self._spans.get((rollout.rollout_id, attempt.attempt_id), []):
                times.append(span.start_time if span.end_time is None else max(span.start_time, span.end_time))
        return max(times)

    async def purge_production(self, before: float) -> int:
        async with self._lock:
            gone = {r.rollout_id for r in self._rollouts.values()
                    if r.mode == RolloutMode.production and self._last_active(r) < before}  # fmt: skip
            if not gone:
                return 0
            for rid in gone:
                self._rollouts.pop(rid)
                self._order.pop(rid, None)
                self._running.discard(rid)
                for attempt in self._attempts.pop(rid, []):
                    self._attempt_pos.pop((rid, attempt.attempt_id), None)
                    self._spans.pop((rid, attempt.attempt_id), None)
            self._span_keys = {k: v for k, v in self._span_keys.items() if k[0] not in gone}
            self._calls = {cid: kept for cid, rows in self._calls.items()
                           if (kept := [row for row in rows if row[2].rollout_id not in gone])}  # fmt: skip
            self._feedback = {k: fb for k, fb in self._feedback.items() if fb.rollout_id not in gone}
            self._feedback_by_client = {
                k: fb for k, fb in self._feedback_by_client.items() if fb.rollout_id not in gone
            }
            return len(gone)

    # ------------------------------------------------------------------ canaries

    def _active_canary(self) -> Canary | None:
        return next((c for c in self._canaries.values() if c.status == CanaryStatus.active), None)

    def _latest_deployed(self) -> Resources | None:
        return next((r for r in reversed(self._resources) if not r.candidate), None)

    async def start_canary(self, canary: CanaryIn) -> Canary:
        async with self._lock:
            baseline_id = canary.baseline_resources_id
            made = production_rules.new_canary(
                canary,
                active=self._active_canary(),
                candidate=self._resources_by_id.get(canary.candidate_resources_id),
                baseline=self._resources_by_id.get(baseline_id) if baseline_id is not None else self._latest_deployed(),
                now=wall_now(),
            )
            self._canaries[made.canary_id] = made
            return made.model_copy(deep=True)

    def _canary(self, canary_id: str) -> Canary:
        try:
            return self._canaries[canary_id]
        except KeyError:
            raise NotFoundError(f"canary {canary_id} not found") from None

    async def get_canary(self, canary_id: str) -> Canary:
        async with self._lock:
            return self._canary(canary_id).model_copy(deep=True)

    async def get_active_canary(self) -> Canary | None:
        async with self._lock:
            active = self._active_canary()
            return active.model_copy(deep=True) if active is not None else None

    async def query_canaries(self, *, limit: int = 100, offset: int = 0) -> list[Canary]:
        lifecycle.check_page(limit, offset)
        async with self._lock:
            newest_first = list(reversed(self._canaries.values()))
            return [c.model_copy(deep=True) for c in newest_first[offset : offset + limit]]

    async def decide_canary(
        self, canary_id: str, decision: CanaryDecision, *, promoted_resources_id: str | None = None
    ) -> Canary:
        async with self._lock:
            decided = production_rules.decide_canary(
                self._canary(canary_id), decision, promoted_resources_id, wall_now()
            )
            self._canaries[canary_id] = decided
            return decided.model_copy(deep=True)
