"""In-process store: dicts behind one asyncio.Lock, for tests, notebooks and single-process runs.

Lifecycle rules come from `lifecycle` so this backend behaves exactly like SQLite; only
storage differs. Everything handed out is a copy, so callers cannot mutate the store.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Sequence
from typing import Any

from agentkiln.models import (
    Attempt,
    AttemptedRollout,
    AttemptError,
    AttemptStatus,
    Canary,
    Feedback,
    Resources,
    ResourcesIn,
    Rollout,
    RolloutConfig,
    RolloutMode,
    RolloutStatus,
    Span,
    SpanIn,
    StoredResponse,
    Worker,
    WorkerStatus,
    new_id,
)
from agentkiln.models import (
    now as wall_now,
)
from agentkiln.store import lifecycle, production_rules
from agentkiln.store.base import NotFoundError, Store
from agentkiln.store.memory_production import MemoryProduction
from agentkiln.store.memory_responses import MemoryResponses

log = logging.getLogger(__name__)


class InMemoryStore(MemoryProduction, MemoryResponses, Store):
    """Dict-backed Store; FIFO via a heap of (creation order, id) with lazy deletion."""

    def __init__(self, *, sweep_interval_s: float | None = 1.0) -> None:
        self._lock = asyncio.Lock()
        self._finished = asyncio.Condition(self._lock)
        self._rollouts: dict[str, Rollout] = {}
        self._order: dict[str, int] = {}  # rollout id -> creation order
        self._waiting: list[tuple[int, str]] = []  # heap; entries may be stale, checked on pop
        self._running: set[str] = set()  # rollout ids with status running (for sweeps)
        self._attempts: dict[str, list[Attempt]] = {}  # rollout id -> attempts by sequence
        # (rollout id, attempt id) -> index in the rollout's attempts: attempt ids are unique per
        # rollout only (every production session's attempt is protocol.SESSION_ATTEMPT_ID)
        self._attempt_pos: dict[tuple[str, str], int] = {}
        self._spans: dict[tuple[str, str], list[Span]] = {}  # (rollout id, attempt id) -> spans by sequence
        self._span_keys: dict[tuple[str, str, str], Span] = {}  # (rollout, attempt, span id) -> stored span
        self._resources: list[Resources] = []
        self._resources_by_id: dict[str, Resources] = {}
        self._workers: dict[str, Worker] = {}
        self._calls: dict[str, list[tuple[int, int, production_rules.CallEntry]]] = {}  # response id -> index rows
        self._call_order = 0
        self._feedback: dict[str, Feedback] = {}  # feedback id -> record, in arrival order
        self._feedback_by_client: dict[str, Feedback] = {}
        self._canaries: dict[str, Canary] = {}  # canary id -> record, in creation order
        self._responses: dict[str, StoredResponse] = {}  # Responses API state (memory_responses)
        self._sweep_interval_s = sweep_interval_s
        self._last_sweep = time.monotonic()

    # ------------------------------------------------------------------ internal state

    def _put_rollout(self, rollout: Rollout) -> None:
        """Store a rollout state and keep the queue/running indexes and waiters in step."""
        old = self._rollouts.get(rollout.rollout_id)
        self._rollouts[rollout.rollout_id] = rollout
        if rollout.status.waiting and (old is None or not old.status.waiting):
            heapq.heappush(self._waiting, (self._order[rollout.rollout_id], rollout.rollout_id))
        if rollout.status == RolloutStatus.running:
            self._running.add(rollout.rollout_id)
        else:
            self._running.discard(rollout.rollout_id)
        if rollout.status.finished and (old is None or not old.status.finished):
            self._finished.notify_all()

    def _put_attempt(self, attempt: Attempt) -> None:
        idx = self._attempt_pos[(attempt.rollout_id, attempt.attempt_id)]
        self._attempts[attempt.rollout_id][idx] = attempt

    def _apply(self, change: lifecycle.Change) -> None:
        if change.attempt is not None:
            self._put_attempt(change.attempt)
        if change.rollout is not None:
            self._put_rollout(change.rollout)

    def _rollout(self, rollout_id: str) -> Rollout:
        try:
            return self._rollouts[rollout_id]
        except KeyError:
            raise NotFoundError(f"rollout {rollout_id} not found") from None

    def _attempt(self, rollout_id: str, attempt_id: str) -> tuple[Attempt, bool]:
        """The attempt and whether it is its rollout's latest; NotFoundError if it isn't that rollout's."""
        self._rollout(rollout_id)
        idx = self._attempt_pos.get((rollout_id, attempt_id))
        if idx is None:
            raise NotFoundError(f"attempt {attempt_id} of rollout {rollout_id} not found")
        attempts = self._attempts[rollout_id]
        return attempts[idx], idx == len(attempts) - 1

    def _start(self, rollout: Rollout, worker_id: str | None) -> AttemptedRollout:
        change = lifecycle.start_attempt(rollout, worker_id, wall_now())
        assert change.rollout is not None and change.attempt is not None
        attempts = self._attempts.setdefault(rollout.rollout_id, [])
        self._attempt_pos[(rollout.rollout_id, change.attempt.attempt_id)] = len(attempts)
        attempts.append(change.attempt)
        self._put_rollout(change.rollout)
        return AttemptedRollout(rollout=change.rollout.model_copy(deep=True), attempt=change.attempt.model_copy())

    def _add(self, rollout: Rollout) -> None:
        self._order[rollout.rollout_id] = len(self._order)
        self._put_rollout(rollout)

    def _sweep_locked(self, now: float) -> list[Attempt]:
        changed = []
        for rid in list(self._running):
            attempts = self._attempts.get(rid) or []
            if not attempts:
                continue
            change = lifecycle.sweep_attempt(self._rollouts[rid], attempts[-1], True, now)
            if change is not None:
                self._apply(change)
                changed.append(change.attempt.model_copy())
        self._last_sweep = time.monotonic()
        return changed

    def _maybe_sweep_locked(self) -> None:
        if self._sweep_interval_s is not None and time.monotonic() - self._last_sweep >= self._sweep_interval_s:
            self._sweep_locked(wall_now())

    # ------------------------------------------------------------------ rollouts

    async def enqueue_rollout(
        self,
        input: Any,
        *,
        mode: RolloutMode | None = None,
        resources_id: str | None = None,
        config: RolloutConfig | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Rollout:
        rollout = lifecycle.new_rollout(
            input, mode=mode, resources_id=resources_id, config=config, metadata=metadata, now=wall_now()
        )
        async with self._lock:
            self._add(rollout)
        return rollout.model_copy(deep=True)

    async def dequeue_rollout(self, worker_id: str | None = None) -> AttemptedRollout | None:
        async with self._lock:
            self._maybe_sweep_locked()
            while self._waiting:
                _, rid = heapq.heappop(self._waiting)
                rollout = self._rollouts.get(rid)  # None: purged since it waited (purge_production)
                if rollout is not None and rollout.status.waiting:
                    return self._start(rollout, worker_id)
            return None

    async def start_rollout(
        self,
        input: Any,
        *,
        mode: RolloutMode | None = None,
        resources_id: str | None = None,
        config: RolloutConfig | None = None,
        metadata: dict[str, Any] | None = None,
        worker_id: str | None = None,
    ) -> AttemptedRollout:
        rollout = lifecycle.new_rollout(
            input, mode=mode, resources_id=resources_id, config=config, metadata=metadata, now=wall_now()
        )
        async with self._lock:
            self._add(rollout)
            return self._start(rollout, worker_id)

    async def get_rollout(self, rollout_id: str) -> Rollout:
        async with self._lock:
            return self._rollout(rollout_id).model_copy(deep=True)

    async def query_rollouts(
        self,
        *,
        status: Sequence[RolloutStatus] | None = None,
        mode: RolloutMode | None = None,
        rollout_ids: Sequence[str] | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Rollout]:
        lifecycle.check_page(limit, offset)
        wanted_status = set(status) if status is not None else None
        async with self._lock:
            if rollout_ids is not None:
                candidates = sorted(
                    (self._rollouts[i] for i in set(rollout_ids) if i in self._rollouts),
                    key=lambda r: self._order[r.rollout_id],
                )
            else:
                candidates = list(self._rollouts.values())  # dicts keep insertion = creation order
            out = [
                r
                for r in candidates
                if (wanted_status is None or r.status in wanted_status) and (mode is None or r.mode == mode)
            ]
            return [r.model_copy(deep=True) for r in out[offset : offset + limit]]

    async def update_rollout(
        self,
        rollout_id: str,
        *,
        status: RolloutStatus | None = None,
        mode: RolloutMode | None = None,
        resources_id: str | None = None,
        config: RolloutConfig | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Rollout:
        async with self._lock:
            rollout = self._rollout(rollout_id)
            attempts = self._attempts.get(rollout_id) or []
            change = lifecycle.update_rollout(
                rollout,
                attempts[-1] if attempts else None,
                status=status,
                mode=mode,
                resources_id=resources_id,
                config=config,
                metadata=metadata,
                now=wall_now(),
            )
            self._apply(change)
            return self._rollouts[rollout_id].model_copy(deep=True)

    async def wait_for_rollouts(self, rollout_ids: Sequence[str], timeout: float | None = None) -> list[Rollout]:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        async with self._finished:
            for rid in rollout_ids:
                self._rollout(rid)
            while True:
                self._maybe_sweep_locked()
                done = [self._rollouts[rid] for rid in rollout_ids if self._rollouts[rid].status.finished]
                remaining = None if deadline is None else deadline - loop.time()
                if len(done) == len(rollout_ids) or (remaining is not None and remaining <= 0):
                    return [r.model_copy(deep=True) for r in done]
                # Wake at least every sweep interval so timeouts are detected while someone waits.
                step = self._sweep_interval_s
                if remaining is not None:
                    step = remaining if step is None else min(step, remaining)
                try:
                    await asyncio.wait_for(self._finished.wait(), step)
                except TimeoutError:
                    pass

    # ------------------------------------------------------------------ attempts

    async def query_attempts(self, rollout_id: str) -> list[Attempt]:
        async with self._lock:
            self._rollout(rollout_id)
            return [a.model_copy() for a in self._attempts.get(rollout_id, [])]

    async def attempt_statuses(self, rollout_id: str) -> dict[str, AttemptStatus]:
        async with self._lock:
            self._rollout(rollout_id)
            return {a.attempt_id: a.status for a in self._attempts.get(rollout_id, [])}

    async def get_latest_attempt(self, rollout_id: str) -> Attempt | None:
        async with self._lock:
            self._rollout(rollout_id)
            attempts = self._attempts.get(rollout_id)
            return attempts[-1].model_copy() if attempts else None

    async def update_attempt(
        self,
        rollout_id: str,
        attempt_id: str,
        *,
        status: AttemptStatus | None = None,
        worker_id: str | None = None,
        error: AttemptError | None = None,
    ) -> Attempt:
        async with self._lock:
            attempt, is_latest = self._attempt(rollout_id, attempt_id)
            change = lifecycle.update_attempt(
                self._rollouts[rollout_id], attempt, is_latest,
                status=status, worker_id=worker_id, error=error, now=wall_now(),
            )  # fmt: skip
            self._apply(change)
            return self._attempt(rollout_id, attempt_id)[0].model_copy()

    # ------------------------------------------------------------------ spans

    async def add_spans(self, spans: Sequence[SpanIn]) -> list[Span]:
        records = [lifecycle.span_record(s) for s in spans]
        async with self._lock:
            for rec in records:  # validate the whole batch before storing any of it
                attempt, _ = self._attempt(rec["rollout_id"], rec["attempt_id"])
                if (rec["rollout_id"], rec["attempt_id"], rec["span_id"]) not in self._span_keys:
                    lifecycle.check_accepts_new_spans(attempt)
            now = wall_now()
            out, added = [], 0
            for rec in records:
                key = (rec["rollout_id"], rec["attempt_id"], rec["span_id"])
                span = self._span_keys.get(key)
                if span is None:  # a re-sent span (or a repeat in this batch) comes back as first stored
                    stored = self._spans.setdefault(key[:2], [])
                    span = Span.model_validate({**rec, "sequence_id": len(stored) + 1})
                    stored.append(span)
                    self._span_keys[key] = span
                    added += 1
                    entry = production_rules.call_entry(rec)
                    if entry is not None:
                        self._call_order += 1
                        self._calls.setdefault(entry.call_id, []).append((entry.choice_index, self._call_order, entry))
                out.append(span.model_copy(deep=True))
            if added < len(records):
                log.info("ignoring %d re-sent span(s)", len(records) - added)
            for rid, aid in {(s.rollout_id, s.attempt_id) for s in spans}:
                attempt, is_latest = self._attempt(rid, aid)
                self._apply(lifecycle.record_activity(self._rollouts[rid], attempt, is_latest, now))
            return out

    async def query_spans(
        self,
        rollout_id: str,
        *,
        attempt_id: str | None = None,
        name: str | None = None,
        limit: int = 10_000,
        offset: int = 0,
    ) -> list[Span]:
        lifecycle.check_page(limit, offset)
        async with self._lock:
            self._rollout(rollout_id)
            attempts = self._attempts.get(rollout_id, [])
            if attempt_id is None:
                ids = [a.attempt_id for a in attempts]
            elif attempt_id == "latest":
                ids = [attempts[-1].attempt_id] if attempts else []
            else:
                ids = [self._attempt(rollout_id, attempt_id)[0].attempt_id]
            out: list[Span] = []
            for aid in ids:
                out.extend(s for s in self._spans.get((rollout_id, aid), []) if name is None or s.name == name)
            return [s.model_copy(deep=True) for s in out[offset : offset + limit]]

    # ------------------------------------------------------------------ resources

    async def add_resources(self, resources: ResourcesIn) -> Resources:
        async with self._lock:
            res = Resources.model_validate(
                {
                    **resources.model_dump(),
                    "resources_id": new_id("res"),
                    "version": len(self._resources) + 1,
                    "created_at": wall_now(),
                }
            )
            self._resources.append(res)
            self._resources_by_id[res.resources_id] = res
            return res.model_copy(deep=True)

    async def get_resources(self, resources_id: str) -> Resources:
        async with self._lock:
            try:
                return self._resources_by_id[resources_id].model_copy(deep=True)
            except KeyError:
                raise NotFoundError(f"resources {resources_id} not found") from None

    async def get_latest_resources(self) -> Resources | None:
        async with self._lock:
            deployed = next((r for r in reversed(self._resources) if not r.candidate), None)
            return deployed.model_copy(deep=True) if deployed is not None else None

    async def query_resources(self, *, limit: int = 100, offset: int = 0) -> list[Resources]:
        lifecycle.check_page(limit, offset)
        async with self._lock:
            return [r.model_copy(deep=True) for r in self._resources[offset : offset + limit]]

    # ------------------------------------------------------------------ workers

    async def heartbeat_worker(
        self,
        worker_id: str,
        *,
        status: WorkerStatus | None = None,
        current_rollout_id: str | None = None,
        current_attempt_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Worker:
        async with self._lock:
            old = self._workers.get(worker_id) or Worker(worker_id=worker_id)
            worker = lifecycle.worker_heartbeat(
                old, status=status, current_rollout_id=current_rollout_id,
                current_attempt_id=current_attempt_id, metadata=metadata, now=wall_now(),
            )  # fmt: skip
            self._workers[worker_id] = worker
            return worker.model_copy(deep=True)

    async def query_workers(self) -> list[Worker]:
        async with self._lock:
            return [w.model_copy(deep=True) for w in self._workers.values()]

    # ------------------------------------------------------------------ lifecycle

    async def check_timeouts(self, now: float | None = None) -> list[Attempt]:
        async with self._lock:
            return self._sweep_locked(wall_now() if now is None else now)
