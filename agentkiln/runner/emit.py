"""`kiln.emit_*`: record rewards, messages, objects and handled exceptions from agent code.

Each call becomes a span on the current attempt (see context.py). Spans are buffered and
written by the worker about once a second and at the end; rewards are written at once
(blocking the calling thread when it is not the worker's event loop) so a reward emitted
just before the agent crashes is not lost.

Outside a rollout (e.g. calling the agent function directly in a notebook) emits are
dropped with a one-time warning, so agent code needs no "am I under kiln?" checks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid
from collections.abc import Mapping
from typing import Any, Union

from agentkiln.models import FailureKind, SpanIn, SpanStatus
from agentkiln.protocol import SpanAttrs, SpanNames
from agentkiln.runner import context
from agentkiln.runner.failures import MAX_MESSAGE_CHARS, classify, exception_type_name, format_stack

logger = logging.getLogger(__name__)

RewardValue = Union[float, int, Mapping[str, float]]

_warned_outside = False


def to_jsonable(obj: Any, _depth: int = 0) -> Any:
    """Best-effort JSON-compatible copy (pydantic models, dataclasses, sets, bytes, repr() fallback)."""
    if _depth > 32:
        return repr(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else repr(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, _depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v, _depth + 1) for v in obj]
    if isinstance(obj, bytes):
        return obj.decode("utf-8", errors="replace")
    if hasattr(obj, "model_dump"):
        try:
            return to_jsonable(obj.model_dump(mode="json"), _depth + 1)
        except Exception:
            pass
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj), _depth + 1)
    return repr(obj)


def reward_value(value: RewardValue) -> tuple[float, dict[str, float] | None]:
    """Scalar reward of a value and its dimensions (None for scalars).

    A multi-dimensional reward's scalar is its "primary" entry when present, else the SUM of
    its dimensions: dimensions are treated as additive reward components (e.g.
    correctness + format penalty), so weight them before emitting if needed.
    """
    if isinstance(value, Mapping):
        if not value:
            raise ValueError("a multi-dimensional reward needs at least one dimension")
        dims = {str(k): float(v) for k, v in value.items()}
        primary = dims["primary"] if "primary" in dims else sum(dims.values())
    else:
        dims = None
        primary = float(value)
    for v in [primary, *(dims or {}).values()]:
        if not math.isfinite(v):
            raise ValueError(f"reward must be finite, got {v!r}")
    return primary, dims


def reward_span(ctx: context.AttemptContext, value: RewardValue, *, name: str, final: bool) -> SpanIn:
    primary, dims = reward_value(value)
    attrs: dict[str, Any] = {
        SpanAttrs.reward_value: primary,
        SpanAttrs.reward_name: name,
        SpanAttrs.reward_final: bool(final),
    }
    if dims is not None:
        attrs[SpanAttrs.reward_dims] = dims
    return _span(ctx, SpanNames.reward, attrs)


def _span(
    ctx: context.AttemptContext,
    name: str,
    attributes: dict[str, Any],
    *,
    start_time: float | None = None,
    error: bool = False,
) -> SpanIn:
    t = time.time()
    return SpanIn(
        rollout_id=ctx.rollout_id,
        attempt_id=ctx.attempt_id,
        name=name,
        trace_id=ctx.trace_id or uuid.uuid4().hex,
        start_time=start_time if start_time is not None else t,
        end_time=t,
        attributes=attributes,
        status=SpanStatus(code="ERROR") if error else SpanStatus(),
    )


def _ctx_or_warn(what: str, quiet: bool = False) -> context.AttemptContext | None:
    global _warned_outside
    ctx = context.current()
    if ctx is None:
        if not _warned_outside and not quiet:
            _warned_outside = True
            logger.warning(
                "%s called outside a kiln rollout (or from a thread started without copy_context while "
                "several attempts run in this process); dropped",
                what,
            )
        return None
    if ctx.closed:
        logger.debug("%s after attempt %s ended; dropped", what, ctx.attempt_id)
        return None
    return ctx


def _add(ctx: context.AttemptContext, span: SpanIn, *, urgent: bool) -> None:
    ctx.buffer.add(span)
    if urgent:
        ctx.buffer.request_flush(wait=True)


def emit_span(
    name: str,
    attributes: dict[str, Any] | None = None,
    *,
    start_time: float | None = None,
    error: bool = False,
    quiet: bool = False,
) -> SpanIn | None:
    """Record a custom span on the current attempt (returns it, or None outside a rollout)."""
    ctx = _ctx_or_warn(f"emit_span({name!r})", quiet)
    if ctx is None:
        return None
    span = _span(ctx, name, to_jsonable(attributes or {}), start_time=start_time, error=error)
    _add(ctx, span, urgent=False)
    return span


def emit_reward(value: RewardValue, *, name: str = "primary", final: bool = True) -> SpanIn | None:
    """Record a reward: a float, or a dict of named dimensions (see `reward_value`).

    final=False marks an intermediate (per-step) reward; the adapter discounts those,
    while the final reward is broadcast over the rollout's LLM calls. Written to the
    store before returning when called off the worker's event loop.
    """
    ctx = _ctx_or_warn("emit_reward")
    if ctx is None:
        return None
    span = reward_span(ctx, value, name=name, final=final)
    _add(ctx, span, urgent=True)
    return span


def _emit_buffered(what: str, name: str, attrs: dict[str, Any]) -> SpanIn | None:
    ctx = _ctx_or_warn(what)
    if ctx is None:
        return None
    span = _span(ctx, name, attrs)
    _add(ctx, span, urgent=False)
    return span


def emit_message(text: str) -> SpanIn | None:
    """Record a free-text log line in the trace (shown by `kiln dev` and the dashboard)."""
    return _emit_buffered("emit_message", SpanNames.message, {SpanAttrs.message_text: str(text)})


def emit_object(obj: Any) -> SpanIn | None:
    """Record any (JSON-convertible) object in the trace: parsed answers, tool results, state."""
    attrs = {SpanAttrs.object_value: to_jsonable(obj), SpanAttrs.object_type: type(obj).__name__}
    return _emit_buffered("emit_object", SpanNames.object, attrs)


def exception_span(ctx: context.AttemptContext, exc: BaseException, kind: FailureKind | None) -> SpanIn:
    attrs = {
        SpanAttrs.failure_kind: (kind or classify(exc)).value,
        SpanAttrs.exception_type: exception_type_name(exc),
        SpanAttrs.exception_message: str(exc)[:MAX_MESSAGE_CHARS],
        SpanAttrs.exception_stack: format_stack(exc),
    }
    return _span(ctx, SpanNames.exception, attrs, error=True)


def emit_exception(exc: BaseException, kind: FailureKind | None = None) -> SpanIn | None:
    """Record an exception the agent handled (the attempt goes on); kind defaults to classify(exc)."""
    ctx = _ctx_or_warn("emit_exception")
    if ctx is None:
        return None
    span = exception_span(ctx, exc, kind)
    _add(ctx, span, urgent=False)
    return span
