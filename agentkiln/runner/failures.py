"""Failure attribution on the runner side: exception types and classification.

Every failed attempt carries a FailureKind so retry policy, dashboards and reward
penalties can tell "the tool broke" from "the model looped" from "the agent crashed".
Users and tool authors raise the exception types below (or wrap tools with
`kiln.tool`); `classify` maps anything else, including errors from the OpenAI client,
httpx and JSON parsing, onto a kind.
"""

from __future__ import annotations

import json
import logging
import traceback

from agentkiln.models import AttemptError, FailureKind

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
