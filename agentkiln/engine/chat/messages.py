"""OpenAI message / tool helpers shared by every chat template (no tokenizer, no torch)."""

from __future__ import annotations

import json
from typing import Any


def content_text(content: Any) -> str:
    """OpenAI content may be a string, None, or a list of parts; keep the text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    return str(content)


def tool_function(tool: dict[str, Any]) -> dict[str, Any]:
    """Accept both `{"type": "function", "function": {...}}` and a bare function definition."""
    fn = tool.get("function", tool) if isinstance(tool, dict) else {}
    return {k: fn[k] for k in ("name", "description", "parameters") if k in fn}


def tool_names(tools: list[dict[str, Any]]) -> set[str]:
    return {fn["name"] for fn in map(tool_function, tools) if isinstance(fn.get("name"), str)}


def arguments_obj(arguments: Any) -> Any:
    """History tool-call arguments are JSON text; embed them as JSON, not as an escaped string."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return arguments
    return arguments if arguments is not None else {}
