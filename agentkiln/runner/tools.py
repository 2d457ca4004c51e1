"""`kiln.tool`: a tool's failures become ToolError/ToolTimeout and each call is recorded as a span."""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from agentkiln.protocol import SpanAttrs, SpanNames
from agentkiln.runner import emit
from agentkiln.runner.failures import (
    MAX_MESSAGE_CHARS,
    KilnFailure,
    ToolError,
    ToolTimeout,
    classify,
    exception_type_name,
)

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

        def fail(exc: Exception, args: tuple, kwargs: dict, start: float) -> NoReturn:
            """Record the failed call, then raise it as a tool failure (the original as its cause)."""
            err = convert(exc)
            _record_tool_span(tool_name, args, kwargs, start, err)
            if err is exc:
                raise exc
            raise err from exc

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
                    fail(exc, args, kwargs, start)
                _record_tool_span(tool_name, args, kwargs, start, None)
                return result

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.time()
            try:
                result = f(*args, **kwargs)
            except Exception as exc:
                fail(exc, args, kwargs, start)
            _record_tool_span(tool_name, args, kwargs, start, None)
            return result

        return wrapper  # type: ignore[return-value]

    if fn is not None:
        return decorate(fn)
    return decorate


def _record_tool_span(name: str, args: tuple, kwargs: dict, start: float, err: Exception | None) -> None:
    attrs: dict[str, Any] = {
        SpanAttrs.tool_name: name,
        SpanAttrs.tool_arguments: emit.to_jsonable({"args": args, **kwargs}),
    }
    if err is not None:
        attrs[SpanAttrs.failure_kind] = classify(err).value
        attrs[SpanAttrs.exception_type] = exception_type_name(err)
        attrs[SpanAttrs.exception_message] = str(err)[:MAX_MESSAGE_CHARS]
    emit.emit_span(SpanNames.tool, attrs, start_time=start, error=err is not None, quiet=True)
