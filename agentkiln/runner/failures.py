"""Failure attribution on the runner side: exception types, classification, loop detection.

Every failed attempt carries a FailureKind so retry policy, dashboards and reward
penalties can tell "the tool broke" from "the model looped" from "the agent crashed".
Users and tool authors raise the exception types below (or wrap tools with
`kiln.tool`); `classify` maps anything else, including errors from the OpenAI client,
httpx and JSON parsing, onto a kind.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import json
import logging
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from agentkiln.models import AttemptError, FailureKind, SpanAttrs, SpanIn

logger = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 4_000
MAX_STACK_CHARS = 20_000


class KilnFailure(Exception):
    """Base of the exceptions whose class fixes the failure kind."""

    kind: FailureKind = FailureKind.agent_exception


class ToolError(KilnFailure):
    """A tool the agent called failed (bad arguments, sandbox error, HTTP error of a tool API...)."""

    kind = FailureKind.tool_error


class ToolTimeout(ToolError, TimeoutError):
    """A tool call ran out of time."""

    kind = FailureKind.tool_timeout


class LLMError(KilnFailure):
    """The model endpoint failed (HTTP error, refused request, empty response)."""

    kind = FailureKind.llm_error


class ParseError(KilnFailure, ValueError):
    """The model's output could not be parsed (malformed tool call, bad JSON, missing answer)."""

    kind = FailureKind.parse_error


class LoopDetected(KilnFailure):
    """The agent repeats itself or exceeded its turn budget."""

    kind = FailureKind.loop


def _llm_exception_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = []
    try:
        import openai

        types += [openai.APIError]
    except ImportError:  # pragma: no cover - openai is a dependency
        pass
    try:
        import httpx

        types += [httpx.HTTPError, httpx.InvalidURL]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _parse_exception_types() -> tuple[type[BaseException], ...]:
    import pydantic

    return (json.JSONDecodeError, pydantic.ValidationError)


def _classify_one(exc: BaseException) -> FailureKind | None:
    if isinstance(exc, KilnFailure):
        return exc.kind
    if isinstance(exc, _llm_exception_types()):
        return FailureKind.llm_error
    if isinstance(exc, _parse_exception_types()):
        return FailureKind.parse_error
    return None


def classify(exc: BaseException) -> FailureKind:
    """FailureKind of an exception, looking through `raise ... from` / implicit context chains.

    An explicit KilnFailure wins wherever it is in the chain; otherwise the outermost
    recognisable cause decides (a framework's wrapper around an openai.APIError is an
    LLM error). A bare TimeoutError is only a tool timeout when raised inside `kiln.tool`
    (which converts it to ToolTimeout); elsewhere it counts as an agent exception.
    """
    chain: list[BaseException] = []
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen and len(chain) < 32:
        seen.add(id(cur))
        chain.append(cur)
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    for e in chain:
        if isinstance(e, KilnFailure):
            return e.kind
    for e in chain:
        kind = _classify_one(e)
        if kind is not None:
            return kind
    return FailureKind.agent_exception


def exception_type_name(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def format_stack(exc: BaseException) -> str:
    stack = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return stack[-MAX_STACK_CHARS:]


def attempt_error(exc: BaseException, kind: FailureKind | None = None) -> AttemptError:
    """The AttemptError recorded for an exception (kind, message, class name, stack)."""
    message = str(exc) or exception_type_name(exc)
    return AttemptError(
        kind=kind or classify(exc),
        message=message[:MAX_MESSAGE_CHARS],
        type=exception_type_name(exc),
        stack=format_stack(exc),
    )


# --------------------------------------------------------------------------- tools

F = TypeVar("F", bound=Callable[..., Any])


def tool(fn: F | None = None, *, name: str | None = None, timeout_s: float | None = None) -> Any:
    """Mark a function as a tool: its failures become ToolError/ToolTimeout and each call is a span.

    Works on sync and async functions, with or without arguments:
    `@kiln.tool`, `@kiln.tool(timeout_s=5)`. `timeout_s` is enforced for async tools
    (asyncio.wait_for); sync tools should enforce their own and raise TimeoutError.
    The original exception stays available as `__cause__`.
    """

    def decorate(f: F) -> F:
        tool_name = name or f.__name__

        def convert(exc: Exception) -> Exception:
            if isinstance(exc, KilnFailure):
                return exc
            if isinstance(exc, TimeoutError):
                return ToolTimeout(f"tool {tool_name!r} timed out: {exc}")
            return ToolError(f"tool {tool_name!r} failed: {exception_type_name(exc)}: {exc}")

        if inspect.iscoroutinefunction(f):

            @functools.wraps(f)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                start = time.time()
                try:
                    if timeout_s is not None:
                        result = await asyncio.wait_for(f(*args, **kwargs), timeout_s)
                    else:
                        result = await f(*args, **kwargs)
                except Exception as exc:
                    err = convert(exc)
                    _record_tool_span(tool_name, args, kwargs, start, err)
                    if err is exc:
                        raise
                    raise err from exc
                _record_tool_span(tool_name, args, kwargs, start, None)
                return result

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.time()
            try:
                result = f(*args, **kwargs)
            except Exception as exc:
                err = convert(exc)
                _record_tool_span(tool_name, args, kwargs, start, err)
                if err is exc:
                    raise
                raise err from exc
            _record_tool_span(tool_name, args, kwargs, start, None)
            return result

        return wrapper  # type: ignore[return-value]

    if fn is not None:
        return decorate(fn)
    return decorate


def _record_tool_span(name: str, args: tuple, kwargs: dict, start: float, err: Exception | None) -> None:
    # Imported here: emit depends on this module for classify().
    from agentkiln.runner import emit

    attrs: dict[str, Any] = {"kiln.tool.name": name, "kiln.tool.arguments": emit.to_jsonable({"args": args, **kwargs})}
    if err is not None:
        attrs[SpanAttrs.failure_kind] = classify(err).value
        attrs[SpanAttrs.exception_type] = exception_type_name(err)
        attrs[SpanAttrs.exception_message] = str(err)[:MAX_MESSAGE_CHARS]
    emit.emit_span("kiln.tool", attrs, start_time=start, error=err is not None, quiet=True)


# --------------------------------------------------------------------------- loops


def _canonical_hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _response_action(response: Any) -> Any:
    """What the model did in one call: content + tool calls (ids stripped, they are random)."""
    if not isinstance(response, dict):
        return response
    actions = []
    for choice in response.get("choices") or []:
        msg = (choice or {}).get("message") or {}
        calls = [
            ((c.get("function") or {}).get("name"), (c.get("function") or {}).get("arguments"))
            for c in msg.get("tool_calls") or []
        ]
        actions.append((msg.get("content"), calls))
    if actions:
        return actions
    if "output" in response:  # responses API
        return [
            {k: v for k, v in item.items() if k not in ("id", "call_id")} if isinstance(item, dict) else item
            for item in response.get("output") or []
        ]
    return response


def _request_key(request: Any) -> Any:
    if isinstance(request, dict):
        return {k: request.get(k) for k in ("messages", "input", "instructions", "tools") if k in request}
    return request


CALL_ID_ATTR = "kiln.llm.call_id"  # set by the gateway; shared by the choices of one call


class LoopGuard:
    """Watches one attempt's LLM call spans for loops.

    Loop = the same request sent `max_repeats` times in a row, or the same action
    (response content + tool calls) produced `max_repeats` times in a row, or more than
    `max_llm_calls` calls in total. Feed it spans incrementally with `observe`; it raises
    LoopDetected. Settings come from rollout.metadata keys `max_llm_calls` and
    `max_repeated_calls` (see `from_metadata`).
    """

    DEFAULT_MAX_REPEATS = 5

    def __init__(self, *, max_repeats: int | None = DEFAULT_MAX_REPEATS, max_llm_calls: int | None = None):
        self.max_repeats = max_repeats
        self.max_llm_calls = max_llm_calls
        self.calls = 0
        self._last: dict[str, tuple[str, int]] = {}
        self._last_call_id: str | None = None

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> LoopGuard:
        repeats = metadata.get("max_repeated_calls", cls.DEFAULT_MAX_REPEATS)
        max_calls = metadata.get("max_llm_calls")
        return cls(
            max_repeats=int(repeats) if repeats else None,
            max_llm_calls=int(max_calls) if max_calls else None,
        )

    def observe(self, spans: Iterable[SpanIn]) -> None:
        for span in spans:
            attrs = span.attributes or {}
            call_id = attrs.get(CALL_ID_ATTR)
            if call_id is not None and call_id == self._last_call_id:
                continue  # another choice (n > 1) of the same call
            self._last_call_id = call_id
            self.calls += 1
            if self.max_llm_calls is not None and self.calls > self.max_llm_calls:
                raise LoopDetected(f"more than {self.max_llm_calls} LLM calls (max_llm_calls)")
            if not self.max_repeats or span.status.code == "ERROR":
                continue  # failed calls retried by the agent are LLM errors, not loops
            keys = {}
            if SpanAttrs.request in attrs:
                keys["request"] = _canonical_hash(_request_key(attrs[SpanAttrs.request]))
            if SpanAttrs.response in attrs:
                keys["action"] = _canonical_hash(_response_action(attrs[SpanAttrs.response]))
            for what, key in keys.items():
                prev = self._last.get(what)
                count = prev[1] + 1 if prev and prev[0] == key else 1
                self._last[what] = (key, count)
                if count >= self.max_repeats:
                    raise LoopDetected(f"the same LLM {what} repeated {count} times in a row")
