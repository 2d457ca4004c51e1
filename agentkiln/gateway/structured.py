"""Structured-output options of both APIs, and the body fields the gateway passes through untouched.

`response_format` (chat completions) and `text.format` (Responses API) become one
`StructuredOutput` on the engine request; a malformed one is a 400 naming the parameter. Whether
the schema itself compiles is the engine's call (the embedded engine answers an invalid schema
with EngineRequestError, also a 400).

Pass-through: sampling and decoding options the gateway does not act on (top_k, min_p,
repetition/presence/frequency penalties, logit_bias, vLLM's guided_* options, anything an SDK's
`extra_body` merged into the body) travel on `ChatRequest.passthrough`, so an upstream
OpenAI-compatible server receives them unchanged.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from agentkiln.engine.base import StructuredOutput
from agentkiln.gateway.errors import invalid

MAX_SCHEMA_CHARS = 65_536  # compiling is linear-ish in the schema; real response schemas are a few KB

# Responses-only fields an upstream chat completions server would not understand.
_RESPONSES_ONLY = frozenset(
    {
        "store",
        "reasoning",
        "truncation",
        "background",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
        "max_tool_calls",
        "prompt",
        "text",
        "stream_options",
    }
)
# Declared chat completions fields the gateway validates but does not act on itself.
_CHAT_FORWARDED = ("logit_bias", "parallel_tool_calls", "user")


def chat_response_format(value: Any) -> StructuredOutput | None:
    """`response_format` -> StructuredOutput (None for absent / {"type": "text"})."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid("'response_format' must be an object", "response_format")
    kind = value.get("type")
    if kind == "json_schema":
        inner = value.get("json_schema")
        if not isinstance(inner, dict):
            raise invalid("'response_format.json_schema' must be an object", "response_format.json_schema")
        return _json_schema(inner, "response_format.json_schema")
    return _simple(kind, "response_format.type")


def responses_text_format(text: Any) -> StructuredOutput | None:
    """Responses API `text.format` -> StructuredOutput (None for absent / {"type": "text"})."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise invalid("'text' must be an object", "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise invalid("'text.format' must be an object", "text.format")
    if fmt.get("type") == "json_schema":
        return _json_schema(fmt, "text.format")
    return _simple(fmt.get("type"), "text.format.type")


def _simple(kind: Any, param: str) -> StructuredOutput | None:
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput(type="json_object")
    raise invalid(f"Unsupported format type {kind!r} (use 'text', 'json_object' or 'json_schema')", param)


def _json_schema(spec: dict[str, Any], param: str) -> StructuredOutput:
    schema, name, strict = spec.get("schema"), spec.get("name"), spec.get("strict")
    if not isinstance(schema, dict):
        raise invalid(f"'{param}.schema' must be a JSON schema object", f"{param}.schema")
    if len(json.dumps(schema)) > MAX_SCHEMA_CHARS:
        raise invalid(f"'{param}.schema' is over {MAX_SCHEMA_CHARS} characters", f"{param}.schema")
    if name is not None and (not isinstance(name, str) or not 0 < len(name) <= 64):
        raise invalid(f"'{param}.name' must be a string of 1 to 64 characters", f"{param}.name")
    if strict is not None and not isinstance(strict, bool):
        raise invalid(f"'{param}.strict' must be a boolean", f"{param}.strict")
    return StructuredOutput(type="json_schema", name=name, json_schema=schema, strict=bool(strict))


def chat_passthrough(req: BaseModel) -> dict[str, Any]:
    """Unknown chat completions fields (extra_body included) plus the declared ones we only validate."""
    out = dict(req.model_extra or {})
    out.pop("response_format", None)  # carried typed, as `structured`
    for name in _CHAT_FORWARDED:
        value = getattr(req, name, None)
        if value is not None:
            out[name] = value
    return out


def responses_passthrough(req: BaseModel) -> dict[str, Any]:
    """Unknown Responses API fields, less the Responses-only ones a chat completions server would reject."""
    out = {k: v for k, v in (req.model_extra or {}).items() if k not in _RESPONSES_ONLY}
    if getattr(req, "parallel_tool_calls", None) is not None:
        out["parallel_tool_calls"] = req.parallel_tool_calls
    if getattr(req, "user", None) is not None:
        out["user"] = req.user
    return out
