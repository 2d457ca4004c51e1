"""The one async interface every store backend (memory, SQLite, PostgreSQL, HTTP client) implements.

The store is the only state the trainer and the agents share, so all lifecycle rules
(retries, timeouts, heartbeats) live behind this interface and behave the same on
every backend; `tests/test_store_parity.py` runs one suite against all of them.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Optional, Sequence

from agentkiln.models import (
    Attempt,
    Canary,
    CanaryDecision,
    CanaryIn,
    Feedback,
    FeedbackIn,
    AttemptedRollout,
    AttemptError,
    AttemptStatus,
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
)

if TYPE_CHECKING:
    from agentkiln.store.idempotency import IdempotencyCache


class StoreError(Exception):
    """Base for errors a caller caused; the server maps them to 4xx."""

    status_code = 400


class NotFoundError(StoreError):
    status_code = 404


class InvalidTransitionError(StoreError):
    status_code = 409


class ValidationError(StoreError):
    status_code = 422


class Store(abc.ABC):
    # ------------------------------------------------------------------ rollouts
    @abc.abstractmethod
    async def enqueue_rollout(
        self,
        input: Any,
        *,
        mode: Optional[RolloutMode] = None,
        resources_id: Optional[str] = None,
        config: Optional[RolloutConfig] = None,
        metadata: Optional[dict[str, Any]] = None,
    ) -> Rollout:
        """Add a rollout in status queuing (FIFO by creation)."""

    async def enqueue_rollouts(self, items: Sequence[dict[str, Any]]) -> list[Rollout]:
        """Batch form of enqueue_rollout; each item holds its keyword arguments."""
        return [await self.enqueue_rollout(**item) for item in items]

    @abc.abstractmethod
    async def dequeue_rollout(self, worker_id: Optional[str] = None) -> Optional[AttemptedRollout]:
        """Oldest waiting (queuing/requeuing) rollout -> running, with a new running attempt; None if empty."""

    @abc.abstractmethod
    async def start_rollout(
        self,
        input: Any,
        *,
        mode: Optional[RolloutMode] = None,
        resources_id: Optional[str] = None,
        config: Optional[RolloutConfig] = None,
        metadata: Optional[dict[str, Any]] = None,
        worker_id: Optional[str] = None,
    ) -> AttemptedRollout:
        """Create a rollout already running with its first attempt (dev mode, direct runs)."""

    @abc.abstractmethod
    async def get_rollout(self, rollout_id: str) -> Rollout:
        """Raises NotFoundError."""

    @abc.abstractmethod
    async def query_rollouts(
        self,
        *,
        status: Optional[Sequence[RolloutStatus]] = None,
        mode: Optional[RolloutMode] = None,
        rollout_ids: Optional[Sequence[str]] = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Rollout]:
        """Ordered by creation (oldest first)."""

    @abc.abstractmethod
    async def update_rollout(
        self,
        rollout_id: str,
        *,
        status: Optional[RolloutStatus] = None,
        mode: Optional[RolloutMode] = None,
        resources_id: Optional[str] = None,
        config: Optional[RolloutConfig] = None,
        metadata: Optional[dict[str, Any]] = None,
    ) -> Rollout:
        """Raises NotFoundError / InvalidTransitionError (e.g. leaving a finished status)."""

    async def cancel_rollout(self, rollout_id: str) -> Rollout:
        return await self.update_rollout(rollout_id, status=RolloutStatus.cancelled)

    @abc.abstractmethod
    async def wait_for_rollouts(self, rollout_ids: Sequence[str], timeout: Optional[float] = None) -> list[Rollout]:
        """Block until all listed rollouts are finished or timeout; returns those finished (in the given order)."""

    # ------------------------------------------------------------------ attempts
    @abc.abstractmethod
    async def query_attempts(self, rollout_id: str) -> list[Attempt]:
        """Ordered by sequence_id. Raises NotFoundError for an unknown rollout (the gateway relies on it)."""

    async def attempt_statuses(self, rollout_id: str) -> dict[str, AttemptStatus]:
        """Status of each attempt by attempt id; NotFoundError for an unknown rollout.

        The gateway checks this before every recorded call, so backends answer it without
        building whole attempts where they can.
        """
        return {a.attempt_id: AttemptStatus(a.status) for a in await self.query_attempts(rollout_id)}

    @abc.abstractmethod
    async def get_latest_attempt(self, rollout_id: str) -> Optional[Attempt]: ...

    @abc.abstractmethod
    async def update_attempt(
        self,
        rollout_id: str,
        attempt_id: str,
        *,
        status: Optional[AttemptStatus] = None,
        worker_id: Optional[str] = None,
        error: Optional[AttemptError] = None,
    ) -> Attempt:
        """Finish or heartbeat an attempt (status=None just heartbeats).

        Finishing the latest attempt moves its rollout: succeeded -> succeeded;
        failed/timeout with a retryable error kind and attempts left -> requeuing; else failed.
        """

    async def heartbeat_attempt(self, rollout_id: str, attempt_id: str) -> Attempt:
        return await self.update_attempt(rollout_id, attempt_id)

    # ------------------------------------------------------------------ spans
    @abc.abstractmethod
    async def add_spans(self, spans: Sequence[SpanIn]) -> list[Span]:
        """Store spans durably before returning; assigns per-attempt sequence ids; counts as heartbeat.

        (rollout_id, attempt_id, span_id) identifies a span: one already stored (or repeated
        within the batch) comes back as first stored and is not added again, so a sender may
        retry a batch whose answer it lost. A span naming an unknown attempt rejects the batch.
        """

    async def add_span(self, span: SpanIn) -> Span:
        return (await self.add_spans([span]))[0]

    @abc.abstractmethod
    async def query_spans(
        self,
        rollout_id: str,
        *,
        attempt_id: Optional[str] = None,
        name: Optional[str] = None,
        limit: int = 10_000,
        offset: int = 0,
    ) -> list[Span]:
        """attempt_id None = all attempts; "latest" = latest attempt. Ordered by (attempt sequence, span sequence)."""

    # ------------------------------------------------------------------ resources
    @abc.abstractmethod
    async def add_resources(self, resources: ResourcesIn) -> Resources:
        """Publish a new version (version = previous + 1); it becomes the latest."""

    @abc.abstractmethod
    async def get_resources(self, resources_id: str) -> Resources: ...

    @abc.abstractmethod
    async def get_latest_resources(self) -> Optional[Resources]:
        """The latest deployed version: candidates (ResourcesIn.candidate) are skipped."""

    @abc.abstractmethod
    async def query_resources(self, *, limit: int = 100, offset: int = 0) -> list[Resources]:
        """Ordered by version."""

    # ------------------------------------------------------------------ workers
    @abc.abstractmethod
    async def heartbeat_worker(
        self,
        worker_id: str,
        *,
        status: Optional[WorkerStatus] = None,
        current_rollout_id: Optional[str] = None,
        current_attempt_id: Optional[str] = None,
        metadata: Optional[dict[str, Any]] = None,
    ) -> Worker: ...

    @abc.abstractmethod
    async def query_workers(self) -> list[Worker]: ...

    # ------------------------------------------------------------------ production (learning from use)
    async def open_session(self, session_id: str, *, metadata: Optional[dict[str, Any]] = None) -> AttemptedRollout:
        """The rollout recording production session `session_id`, created on first use.

        Rollout id `protocol.session_rollout_id(session_id)`, mode production, status running, one
        attempt `protocol.SESSION_ATTEMPT_ID` with no worker that no sweep times out; input
        `{"session_id": session_id}`. Idempotent and safe under concurrent first calls (one rollout).
        """
        raise NotImplementedError

    async def add_feedback(self, feedback: FeedbackIn) -> Feedback:
        """Store durably before returning. The target is resolved and must exist (NotFoundError):
        a response id to the span of that call (its `kiln.llm.call_id`, choice 0 first), a session
        id to its rollout, a span id to that span. The same `client_id` returns the first stored.
        """
        raise NotImplementedError

    async def query_feedback(
        self,
        *,
        session_id: Optional[str] = None,
        rollout_id: Optional[str] = None,
        response_id: Optional[str] = None,
        since: Optional[float] = None,
        limit: int = 1_000,
        offset: int = 0,
    ) -> list[Feedback]:
        """Oldest first; `session_id` matches feedback on the session and on each of its calls."""
        raise NotImplementedError

    async def purge_production(self, before: float) -> int:
        """Retention: delete production rollouts last active before `before` with their attempts,
        spans and feedback; returns how many rollouts went."""
        raise NotImplementedError

    async def start_canary(self, canary: CanaryIn) -> Canary:
        """A new active canary (InvalidTransitionError if one is active; NotFoundError for unknown
        resources); records a "start" decision. Baseline default: the latest deployed version."""
        raise NotImplementedError

    async def get_canary(self, canary_id: str) -> Canary:
        raise NotImplementedError

    async def get_active_canary(self) -> Optional[Canary]:
        raise NotImplementedError

    async def query_canaries(self, *, limit: int = 100, offset: int = 0) -> list[Canary]:
        """Newest first."""
        raise NotImplementedError

    async def decide_canary(
        self,
        canary_id: str,
        decision: CanaryDecision,
        *,
        promoted_resources_id: Optional[str] = None,
    ) -> Canary:
        """End an active canary: "promote" -> promoted, "rollback" -> rolled_back; the decision is
        appended. InvalidTransitionError when it is no longer active (one decider wins a race)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ Responses API state
    @abc.abstractmethod
    async def put_response(self, record: StoredResponse) -> None:
        """Store durably before returning; a record of the same id is replaced (a retried put)."""

    @abc.abstractmethod
    async def get_response(self, response_id: str) -> StoredResponse:
        """Raises NotFoundError. Age is the caller's rule (it compares `created_at`), so a record
        past its age but not yet purged still comes back."""

    @abc.abstractmethod
    async def delete_response(self, response_id: str) -> None:
        """Raises NotFoundError when there is none."""

    @abc.abstractmethod
    async def purge_responses(self, *, before: float, max_bytes: int, limit: int = 1_000) -> int:
        """The bounds: delete records created before `before`, then the oldest while the sizes of all
        together exceed `max_bytes`; at most `limit` per call (bounded work: call again while it
        returns `limit`). Returns how many went."""

    # ------------------------------------------------------------------ lifecycle
    @abc.abstractmethod
    async def check_timeouts(self, now: Optional[float] = None) -> list[Attempt]:
        """Sweep running attempts: past config.timeout_s -> timeout; silent past unresponsive_s -> unresponsive.

        Applies the retry policy to their rollouts; returns the attempts it changed.
        Backends also run this on their own every ~second while serving.
        """

    def idempotency_cache(self) -> Optional["IdempotencyCache"]:
        """Answers to keyed writes shared by every server on this store; None: each server keeps its own."""
        return None

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> "Store":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
