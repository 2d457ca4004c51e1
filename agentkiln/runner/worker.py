"""One runner worker: take a rollout, run the agent on it, report what happened.

The worker owns the attempt's bookkeeping so agents stay plain functions: it heartbeats,
flushes emitted spans, enforces the rollout's timeout locally (the server's sweep is the
backstop for runners that die), watches LLM call spans for loops, turns the return value
into reward spans and the exception (if any) into an AttemptError with a FailureKind.
Retries are the store's business: the worker only reports how the attempt ended.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agentkiln.models import (
    AttemptedRollout,
    AttemptError,
    AttemptStatus,
    FailureKind,
    Resources,
    SpanIn,
    WorkerStatus,
)
from agentkiln.protocol import SpanAttrs, SpanNames, attempt_base_url
from agentkiln.runner import context, emit
from agentkiln.runner.agent import PLACEHOLDER_API_KEY, BaseAgent, Invocation, LLMHandle
from agentkiln.runner.failures import LoopDetected, attempt_error
from agentkiln.runner.loop_guard import LoopGuard
from agentkiln.runner.server_llm import MissingLLM, server_model
from agentkiln.store.base import NotFoundError, Store, StoreError

logger = logging.getLogger(__name__)


@dataclass
class WorkerConfig:
    """Timing and endpoints of a worker (defaults suit a real deployment; tests shrink them)."""

    # Server URL; the agent's LLM base_url becomes {gateway_url}/rollout/{rid}/attempt/{aid}/v1.
    # None: agents get the endpoint published in the resources as is (calls are not recorded).
    gateway_url: str | None = None
    api_key: str | None = None
    poll_interval_s: float = 1.0
    heartbeat_s: float = 5.0
    flush_interval_s: float = 1.0
    cancel_grace_s: float = 2.0
    check_loops: bool = True
    after_attempt: Callable[[], Any] | None = None  # e.g. flush an OpenTelemetry provider


@dataclass
class AttemptOutcome:
    rollout_id: str
    attempt_id: str
    status: AttemptStatus
    error: AttemptError | None = None
    reward: float | None = None
    value: Any = None
    reported: bool = True


def default_worker_id(index: int = 0) -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{index}-{uuid.uuid4().hex[:4]}"


class _Abandon(Exception):
    """The attempt ended elsewhere (cancelled rollout, attempt finished by the server)."""


class RolloutWorker:
    """Runs attempts of one agent against one store, one at a time."""

    def __init__(
        self,
        agent: BaseAgent,
        store: Store,
        *,
        worker_id: str | None = None,
        config: WorkerConfig | None = None,
    ):
        self.agent = agent
        self.store = store
        self.worker_id = worker_id or default_worker_id()
        self.config = config or WorkerConfig()
        self._resources_cache: dict[str, Resources] = {}
        self._server_model: str | None = None  # the gateway's own model, for resources naming no LLM
        self.completed = 0

    # ------------------------------------------------------------------ loop
    async def run(
        self,
        *,
        should_stop: Callable[[], bool] = lambda: False,
        claim: Callable[[], bool] | None = None,
        unclaim: Callable[[], None] | None = None,
        until_empty: bool = False,
    ) -> int:
        """Work until should_stop() (checked between attempts) or, with until_empty, the queue is empty.

        `claim` reserves one unit of a shared rollout budget before each dequeue (False = budget
        spent); `unclaim` returns it when the queue was empty. Returns attempts run.
        """
        await self.agent.prepare()
        await self._heartbeat_worker(WorkerStatus.idle)
        last_beat = time.monotonic()
        try:
            while not should_stop():
                if claim is not None and not claim():
                    break
                try:
                    ar = await self.store.dequeue_rollout(self.worker_id)
                except StoreError as exc:
                    logger.warning("dequeue failed: %r", exc)
                    ar = None
                if ar is None:
                    if unclaim is not None:
                        unclaim()
                    if until_empty:
                        break
                    if time.monotonic() - last_beat >= self.config.heartbeat_s:
                        await self._heartbeat_worker(WorkerStatus.idle)
                        last_beat = time.monotonic()
                    await _sleep_unless(should_stop, self.config.poll_interval_s)
                    continue
                await self.run_attempt(ar)
                await self._heartbeat_worker(WorkerStatus.idle)
                last_beat = time.monotonic()
        finally:
            await self._heartbeat_worker(WorkerStatus.stopped)
        return self.completed

    async def _heartbeat_worker(
        self, status: WorkerStatus, rollout_id: str | None = None, attempt_id: str | None = None
    ) -> None:
        try:
            await self.store.heartbeat_worker(
                self.worker_id,
                status=status,
                current_rollout_id=rollout_id,
                current_attempt_id=attempt_id,
                metadata={"agent": self.agent.name, "pid": os.getpid()},
            )
        except Exception as exc:  # a missed worker heartbeat must not stop the work
            logger.warning("worker heartbeat failed: %r", exc)

    # ------------------------------------------------------------------ resources
    async def resolve_resources(self, resources_id: str | None) -> Resources | None:
        if resources_id is None:
            return await self.store.get_latest_resources()
        cached = self._resources_cache.get(resources_id)
        if cached is None:
            cached = await self.store.get_resources(resources_id)  # immutable: cache forever
            self._resources_cache[resources_id] = cached
        return cached

    async def default_llm(self, resources: Resources | None) -> tuple[str | None, str]:
        """(model, why none) of the server's engine when no resources name an LLM (see runner/server_llm.py)."""
        if (resources is not None and resources.llms) or not self.config.gateway_url:
            return None, "no resources name an LLM and this runner has no server"
        if self._server_model is None:
            model, why = await server_model(self.config.gateway_url, self.config.api_key)
            if model is None:
                return None, why
            self._server_model = model
        return self._server_model, ""

    def build_invocation(
        self, ar: AttemptedRollout, resources: Resources | None, server_llm: tuple[str | None, str] | None = None
    ) -> Invocation:
        rid, aid = ar.rollout.rollout_id, ar.attempt.attempt_id
        # The agent gets the attempt's own token (its gateway calls and spans only), never the runner's key;
        # a store without a server (no token) falls back to the configured key.
        agent_key = ar.token or self.config.api_key
        base_url = None
        if self.config.gateway_url:
            base_url = attempt_base_url(self.config.gateway_url, rid, aid)
        llms: dict[str, LLMHandle] = {}
        if resources is not None:
            for name, endpoint in resources.llms.items():
                llms[name] = LLMHandle.from_endpoint(name, endpoint, base_url=base_url, api_key=agent_key)
        # `llm` is the shared endpoint, never one naming a single agent's weights (unless that is all there is).
        main = llms.get("main") or next((h for h in llms.values() if h.agent is None), None)
        main = main or next(iter(llms.values()), None)
        if main is None and server_llm is not None:  # nothing published: the server's own engine, or why not
            model, why = server_llm
            main = LLMHandle(base_url, model, agent_key or PLACEHOLDER_API_KEY) if model else MissingLLM(why)
            if model:
                llms["main"] = main
        return Invocation(
            task=ar.rollout.input,
            rollout=ar.rollout,
            attempt=ar.attempt,
            resources=resources,
            llm=main,
            llms=llms,
            prompts=dict(resources.prompts) if resources is not None else {},
            server_url=self.config.gateway_url.rstrip("/") if self.config.gateway_url else None,
            api_key=agent_key,
        )

    # ------------------------------------------------------------------ one attempt
    async def run_attempt(self, ar: AttemptedRollout) -> AttemptOutcome:
        """Run the agent on a dequeued (or started) attempt and report the result to the store."""
        rollout, attempt = ar.rollout, ar.attempt
        rid, aid = rollout.rollout_id, attempt.attempt_id
        loop = asyncio.get_running_loop()
        await self._heartbeat_worker(WorkerStatus.busy, rid, aid)
        ctx = context.AttemptContext(
            rollout=rollout,
            attempt=attempt,
            store=self.store,
            buffer=context.SpanBuffer(self.store, loop),
            trace_id=uuid.uuid4().hex,
            worker_id=self.worker_id,
        )
        outcome = AttemptOutcome(rid, aid, AttemptStatus.succeeded)
        context.activate(ctx)
        try:
            try:
                ctx.resources = await self.resolve_resources(rollout.resources_id)
                inv = self.build_invocation(ar, ctx.resources, await self.default_llm(ctx.resources))
            except Exception as exc:
                logger.warning("rollout %s: resources unavailable: %r", rid, exc)
                outcome.status, outcome.error = AttemptStatus.failed, attempt_error(exc, FailureKind.agent_exception)
            else:
                await self._supervise(ctx, inv, outcome)
        except _Abandon as exc:
            logger.info("attempt %s abandoned: %s", aid, exc)
            outcome.reported = False
        finally:
            context.deactivate(ctx)
        if outcome.error is not None and outcome.status != AttemptStatus.succeeded:
            ctx.buffer.add(_error_span(ctx, outcome.error))
        await self._finish(ctx, outcome)
        self.completed += 1
        return outcome

    async def _supervise(self, ctx: context.AttemptContext, inv: Invocation, outcome: AttemptOutcome) -> None:
        cfg = self.config
        task = self._start_agent(ctx, inv)
        guard = LoopGuard.from_metadata(ctx.rollout.metadata) if cfg.check_loops else None
        seen_llm_spans = 0
        timeout_s = ctx.rollout.config.timeout_s
        started = time.monotonic()
        last_beat = started
        tick = max(0.01, min(cfg.flush_interval_s, cfg.heartbeat_s))
        try:
            while True:
                wait = tick
                if timeout_s is not None:
                    wait = min(wait, max(0.0, started + timeout_s - time.monotonic()))
                done, _ = await asyncio.wait({task}, timeout=wait)
                if done:
                    break
                if timeout_s is not None and time.monotonic() - started >= timeout_s:
                    await self._stop_agent(task)
                    outcome.status = AttemptStatus.timeout
                    outcome.error = AttemptError(
                        kind=FailureKind.timeout, message=f"rollout timed out after {timeout_s:g} s", type="Timeout"
                    )
                    return
                await ctx.buffer._flush_quietly()
                if time.monotonic() - last_beat < cfg.heartbeat_s:
                    continue
                last_beat = time.monotonic()
                await self._heartbeat_attempt(ctx)
                if guard is not None:
                    try:
                        spans = await self.store.query_spans(
                            ctx.rollout_id, attempt_id=ctx.attempt_id, name=SpanNames.llm_call, offset=seen_llm_spans
                        )
                        seen_llm_spans += len(spans)
                        guard.observe(spans)
                    except LoopDetected as exc:
                        await self._stop_agent(task)
                        outcome.status, outcome.error = AttemptStatus.failed, attempt_error(exc)
                        return
                    except StoreError as exc:
                        logger.debug("loop check skipped: %r", exc)
        except BaseException:
            # Worker cancelled (runner stopping hard) or abandoned: do not leave the agent running.
            if not task.done():
                task.cancel()
            raise
        try:
            value = task.result()
        except BaseException as exc:  # CancelledError too: the agent cancelled itself
            outcome.status, outcome.error = AttemptStatus.failed, attempt_error(exc)
            return
        try:
            outcome.value = value
            outcome.reward = self._record_return(ctx, value)
        except Exception as exc:
            outcome.status, outcome.error = AttemptStatus.failed, attempt_error(exc, FailureKind.agent_exception)

    def _start_agent(self, ctx: context.AttemptContext, inv: Invocation) -> asyncio.Future[Any]:
        run_ctx = contextvars.copy_context()
        run_ctx.run(context._current.set, ctx)
        if self.agent.is_async():
            coro = run_ctx.run(self.agent.call, inv)
            return asyncio.get_running_loop().create_task(coro, context=run_ctx)
        return _run_in_daemon_thread(run_ctx, self.agent.call, inv, name=f"kiln-agent-{ctx.attempt_id}")

    async def _stop_agent(self, task: asyncio.Future[Any]) -> None:
        """Cancel the agent; a sync agent's thread cannot be killed and is abandoned (its emits are dropped)."""
        task.cancel()
        await asyncio.wait({task}, timeout=self.config.cancel_grace_s)
        if not task.done():
            logger.warning(
                "agent did not stop within %.1fs after cancellation; abandoning it", self.config.cancel_grace_s
            )

    async def _heartbeat_attempt(self, ctx: context.AttemptContext) -> None:
        try:
            att = await self.store.heartbeat_attempt(ctx.rollout_id, ctx.attempt_id)
            rollout = await self.store.get_rollout(ctx.rollout_id)
        except NotFoundError as exc:
            raise _Abandon(f"attempt gone: {exc}") from exc
        except StoreError as exc:
            if getattr(exc, "status_code", 0) == 409:
                raise _Abandon(f"attempt closed by the store: {exc}") from exc
            logger.warning("attempt heartbeat failed: %r", exc)
            return
        if att.status.finished:
            raise _Abandon(f"attempt is {att.status.value} in the store")
        if rollout.status.finished:
            raise _Abandon(f"rollout is {rollout.status.value}")

    def _record_return(self, ctx: context.AttemptContext, value: Any) -> float | None:
        """Store the agent's return value: reward, spans or an object span. Returns the reward if any."""
        if value is None:
            return None
        if isinstance(value, (int, float)) or (
            isinstance(value, dict) and value and all(isinstance(v, (int, float)) for v in value.values())
        ):
            span = emit.reward_span(ctx, value, name="primary", final=True)
            ctx.buffer.add(span)
            return span.attributes[SpanAttrs.reward_value]
        if isinstance(value, list) and all(isinstance(s, (SpanIn, dict)) for s in value):
            for item in value:
                data = item.model_dump() if isinstance(item, SpanIn) else dict(item)
                data.update(rollout_id=ctx.rollout_id, attempt_id=ctx.attempt_id)
                data.pop("sequence_id", None)
                ctx.buffer.add(SpanIn.model_validate(data))
            return None
        logger.warning(
            "agent %s returned %s; expected a reward, a dict of rewards, None or a list of spans; stored as kiln.object",
            self.agent.name,
            type(value).__name__,
        )
        ctx.buffer.add(
            emit._span(ctx, SpanNames.object, {SpanAttrs.object_value: emit.to_jsonable(value), SpanAttrs.object_type: "return"})
        )
        return None

    async def _finish(self, ctx: context.AttemptContext, outcome: AttemptOutcome) -> None:
        if self.config.after_attempt is not None:
            try:
                await asyncio.to_thread(self.config.after_attempt)
            except Exception as exc:
                logger.warning("after_attempt hook failed: %r", exc)
        try:
            await ctx.buffer.flush(retries=context.FLUSH_RETRIES)
        except Exception as exc:
            logger.error("attempt %s: %d span(s) could not be stored: %r", ctx.attempt_id, len(ctx.buffer), exc)
        if not outcome.reported:
            return
        try:
            await self.store.update_attempt(
                ctx.rollout_id, ctx.attempt_id, status=outcome.status, worker_id=self.worker_id, error=outcome.error
            )
        except StoreError as exc:
            # e.g. the server's sweep already timed the attempt out; its verdict stands.
            outcome.reported = False
            logger.warning("attempt %s: store refused status %s: %r", ctx.attempt_id, outcome.status.value, exc)
        log = logger.info if outcome.status == AttemptStatus.succeeded else logger.warning
        log(
            "rollout %s attempt %s: %s%s",
            ctx.rollout_id,
            ctx.attempt_id,
            outcome.status.value,
            f" ({outcome.error.kind.value}: {outcome.error.message[:200]})" if outcome.error else "",
        )


def _error_span(ctx: context.AttemptContext, error: AttemptError) -> SpanIn:
    attrs = {
        SpanAttrs.failure_kind: error.kind.value,
        SpanAttrs.exception_type: error.type,
        SpanAttrs.exception_message: error.message,
        SpanAttrs.exception_stack: error.stack,
    }
    return emit._span(ctx, SpanNames.exception, {k: v for k, v in attrs.items() if v is not None}, error=True)


def _run_in_daemon_thread(
    run_ctx: contextvars.Context, fn: Callable[..., Any], *args: Any, name: str
) -> asyncio.Future[Any]:
    """Run fn in its own daemon thread (not a pool: a timed-out agent thread may never return)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def target() -> None:
        try:
            result = run_ctx.run(fn, *args)
            if inspect.isawaitable(result):  # a sync wrapper around an async agent
                result = run_ctx.run(asyncio.run, _await(result))
        except BaseException as exc:  # noqa: BLE001 - handed to the worker
            ok, value = False, exc
        else:
            ok, value = True, result
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:  # loop closed: the worker is gone
            pass

    threading.Thread(target=target, name=name, daemon=True).start()
    return fut


async def _await(awaitable: Any) -> Any:
    return await awaitable


async def _sleep_unless(should_stop: Callable[[], bool], seconds: float) -> None:
    end = time.monotonic() + seconds
    while not should_stop():
        left = end - time.monotonic()
        if left <= 0:
            return
        await asyncio.sleep(min(left, 0.1))
