"""The gateway's request limits in one place, and the JSON reader that enforces the body-shape ones.

Every limit answers a clear 400 (never a 500, never a stalled event loop):

| what | limit | where |
|---|---|---|
| body size | `incoming.MAX_BODY_BYTES` | 413 |
| JSON nesting depth | `MAX_JSON_DEPTH` | here (Python's parser would raise RecursionError deeper) |
| JSON numbers | integers within int64, floats finite (no `NaN`, `Infinity`, `1e999`) | here |
| strings | valid Unicode (no lone surrogates: they cannot be encoded back to UTF-8) | here |
| stop strings | `engine.limits.MAX_STOP_STRINGS` of `MAX_STOP_CHARS` each | request models |
| max_tokens, n, n x max_tokens | `MAX_TOKENS`, `MAX_N`, `MAX_TOTAL_TOKENS` | request models |
| no max_tokens | until a stop or the context; `kiln serve --max-tokens-default N` bounds it; per choice at most `unlimited_cap(n)` (n x it <= `MAX_TOTAL_TOKENS`) | engine |
| seed | int64 | request models |
| logit_bias | `MAX_LOGIT_BIAS` entries, token id keys in 0..2^31-1, values in -100..100 | request models |
| messages / input items | `MAX_MESSAGES`, their text `MAX_PROMPT_CHARS` in all | request models |
| top_logprobs | 0..20 | request models |
| temperature | 0..2; below `GREEDY_BELOW_TEMPERATURE` it is greedy | request models, engine |
| prompt tokens | under the model's context length (the 400 names both numbers); a prompt whose text is surely longer is refused before tokenizing, others over 8,192 characters are tokenized off the event loop | engine |
| waiting sequences | the embedded engine's `max_waiting`: 503 + Retry-After beyond it | engine |

A body over `PARSE_OFF_LOOP_BYTES` is parsed and checked in a worker thread, so a large body
never holds up the other requests on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any, Optional

from agentkiln.engine.limits import (  # noqa: F401  (re-exported: the limits are read from here)
    GREEDY_BELOW_TEMPERATURE,
    INT64_MAX,
    INT64_MIN,
    MAX_MESSAGES,
    MAX_N,
    MAX_PROMPT_CHARS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOKENS,
    MAX_TOTAL_TOKENS,
    stop_error,
    total_tokens_error,
)
from agentkiln.gateway.errors import invalid

MAX_JSON_DEPTH = 64  # OpenAI bodies nest ~6 deep; tool JSON schemas rarely past 20
MAX_LOGIT_BIAS = 1_024
MAX_TOKEN_ID = 2**31 - 1
PARSE_OFF_LOOP_BYTES = 256_000

_MAX_INT_DIGITS = 20  # a longer literal is out of int64 range anyway (checked before int() parses it)


class BodyRejected(ValueError):
    """The body breaks a limit; `param` names the field when one is to blame."""

    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.param = param


def _parse_int(text: str) -> int:
    digits = len(text) - (text[0] == "-")
    if digits > _MAX_INT_DIGITS:
        raise BodyRejected(f"Integer with {digits} digits is out of range (integers must fit in 64 bits)")
    value = int(text)
    if not INT64_MIN <= value <= INT64_MAX:
        raise BodyRejected(f"Integer {value} is out of range (integers must fit in 64 bits)")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BodyRejected(f"Number {text[:40]} is out of range (numbers must be finite)")
    return value


def _parse_constant(name: str) -> float:
    raise BodyRejected(f"{name} is not valid JSON (numbers must be finite)")


def loads(raw: bytes) -> Any:
    """JSON with the body-shape limits: depth, int64 integers, finite floats, encodable strings."""
    try:
        value = json.loads(raw, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except RecursionError:
        raise BodyRejected(f"JSON nested too deeply (the limit is {MAX_JSON_DEPTH} levels)") from None
    check_shape(value)
    return value


async def loads_async(raw: bytes) -> Any:
    """`loads`, in a worker thread when the body is large."""
    if len(raw) > PARSE_OFF_LOOP_BYTES:
        return await asyncio.to_thread(loads, raw)
    return loads(raw)


def check_shape(value: Any) -> None:
    """Depth at most MAX_JSON_DEPTH and no string (or key) with a lone surrogate; iterative, never recursive."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            if depth > MAX_JSON_DEPTH:
                raise BodyRejected(f"JSON nested too deeply (the limit is {MAX_JSON_DEPTH} levels)")
            for k, v in node.items():
                _check_text(k)
                if isinstance(v, str):
                    _check_text(v)
                elif isinstance(v, (dict, list)):
                    stack.append((v, depth + 1))
        elif isinstance(node, list):
            if depth > MAX_JSON_DEPTH:
                raise BodyRejected(f"JSON nested too deeply (the limit is {MAX_JSON_DEPTH} levels)")
            for v in node:
                if isinstance(v, str):
                    _check_text(v)
                elif isinstance(v, (dict, list)):
                    stack.append((v, depth + 1))
        elif isinstance(node, str):
            _check_text(node)


def _check_text(s: str) -> None:
    if s.isascii():
        return
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise BodyRejected("JSON string holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text") from None


# --------------------------------------------------------------------------- field checks


def logit_bias_error(bias: dict[str, float]) -> Optional[str]:
    """Why a logit_bias map is out of bounds (OpenAI: token id -> -100..100), or None."""
    if len(bias) > MAX_LOGIT_BIAS:
        return f"at most {MAX_LOGIT_BIAS} logit_bias entries are allowed (got {len(bias)})"
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10 and int(key) <= MAX_TOKEN_ID):
            return f"logit_bias key {key[:40]!r} is not a token id (0..{MAX_TOKEN_ID})"
        if not -100.0 <= value <= 100.0:
            return f"logit_bias value {value} for token {key} is out of range (-100..100)"
    return None


def check_generation(n: int, max_tokens: Optional[int], param: str = "n") -> None:
    """400 when n x max_tokens is more than one request may make the engine generate.

    No limit (None) passes: the engine then generates until a stop or the context limit, at most
    `engine.limits.unlimited_cap(n)` tokens per choice, so n x that stays within MAX_TOTAL_TOKENS.
    """
    if max_tokens is None:
        return
    problem = total_tokens_error(n, max_tokens)
    if problem:
        raise invalid(f"Request asks for too many tokens: {problem}", param, "too_many_tokens")


def check_prompt_size(messages: list[dict[str, Any]], tools: list[dict[str, Any]], param: str) -> None:
    """400 when the text of the messages and tool definitions is over MAX_PROMPT_CHARS (before any templating)."""
    chars = 0
    for msg in messages:
        chars += len(msg.get("content") or "")
        for call in msg.get("tool_calls") or ():
            chars += len(call["function"]["arguments"]) + len(call["function"]["name"])
    if tools:
        chars += len(json.dumps(tools))
    if chars > MAX_PROMPT_CHARS:
        raise invalid(
            f"Prompt too long: {chars} characters of text; the limit is {MAX_PROMPT_CHARS}", param, "prompt_too_long"
        )
