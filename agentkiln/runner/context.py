"""Which rollout/attempt the running code belongs to, so `kiln.emit_*` works anywhere.

The worker sets a ContextVar before starting the agent. asyncio tasks, `asyncio.to_thread`
and `contextvars.copy_context().run` inherit it; plain `threading.Thread`s started by the
agent do not, so `current()` falls back to the only attempt active in this process when
there is exactly one (the usual case in process mode).

Spans go into an AttemptContext's buffer; the worker's event loop writes them to the
store (periodically, at the end, and at once for rewards).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from agentkiln.models import Attempt, Resources, Rollout, SpanIn
from agentkiln.store.base import Store

logger = logging.getLogger(__name__)

FLUSH_RETRIES = 3


class SpanBuffer:
    """Thread-safe queue of spans for one attempt, written to the store in arrival order."""

    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop):
        self.store = store
        self.loop = loop
        self._pending: list[SpanIn] = []
        self._lock = threading.Lock()
        self._flush_lock: asyncio.Lock | None = None
        self.written = 0

    def add(self, span: SpanIn) -> None:
        with self._lock:
            self._pending.append(span)

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    async def flush(self, *, retries: int = 1) -> None:
        """Write what is pending; on failure keep it (in order) for the next flush and raise."""
        if self._flush_lock is None:
            self._flush_lock = asyncio.Lock()
        async with self._flush_lock:
            with self._lock:
                batch, self._pending = self._pending, []
            if not batch:
                return
            for i in range(retries):
                try:
                    await self.store.add_spans(batch)
                    self.written += len(batch)
                    return
                except Exception:
                    if i == retries - 1:
                        with self._lock:
                            self._pending = batch + self._pending
                        raise
                    await asyncio.sleep(0.2 * (i + 1))

    def request_flush(self, *, wait: bool) -> None:
        """Flush soon from any thread; with wait=True (off-loop callers) block until written."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            task = self.loop.create_task(self._flush_quietly())
            _background.add(task)
            task.add_done_callback(_background.discard)
            return
        if self.loop.is_closed():
            return
        fut = asyncio.run_coroutine_threadsafe(self._flush_quietly(), self.loop)
        if wait:
            try:
                fut.result(timeout=30)
            except Exception as exc:  # TimeoutError, loop stopped
                logger.warning("flushing spans from a thread did not finish: %r", exc)

    async def _flush_quietly(self) -> None:
        try:
            await self.flush(retries=FLUSH_RETRIES)
        except Exception as exc:
            logger.warning("writing spans failed, will retry at the next flush: %r", exc)


_background: set[asyncio.Task] = set()


@dataclass
class AttemptContext:
    """Everything emit_* and the agent need to know about the attempt being run."""

    rollout: Rollout
    attempt: Attempt
    store: Store
    buffer: SpanBuffer
    resources: Resources | None = None
    trace_id: str = ""
    worker_id: str | None = None
    closed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rollout_id(self) -> str:
        return self.rollout.rollout_id

    @property
    def attempt_id(self) -> str:
        return self.attempt.attempt_id


_current: contextvars.ContextVar[AttemptContext | None] = contextvars.ContextVar("kiln_attempt", default=None)
_active: dict[str, AttemptContext] = {}
_active_lock = threading.Lock()


def current() -> AttemptContext | None:
    """The attempt of the calling code, or None outside any rollout."""
    ctx = _current.get()
    if ctx is not None:
        return ctx
    with _active_lock:
        if len(_active) == 1:
            return next(iter(_active.values()))
    return None


def activate(ctx: AttemptContext) -> contextvars.Token:
    """Make ctx current (in this context) and known process-wide; undo with `deactivate`."""
    with _active_lock:
        _active[ctx.attempt_id] = ctx
    return _current.set(ctx)


def deactivate(ctx: AttemptContext, token: contextvars.Token | None = None) -> None:
    """Close ctx: later emits from abandoned agent code are dropped."""
    ctx.closed = True
    with _active_lock:
        _active.pop(ctx.attempt_id, None)
    if token is not None:
        try:
            _current.reset(token)
        except ValueError:  # token from another context
            _current.set(None)


def active_count() -> int:
    with _active_lock:
        return len(_active)
