"""Hermes-style tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

Used by SmolLM2's prompt convention and by the chat templates of Hermes, Qwen2.5/3 and most
tool-calling models that ship a Jinja template with `tools` support.
"""

from __future__ import annotations

import json
import re
from typing import Any

from agentkiln.engine.base import ToolCall
from agentkiln.engine.chat.messages import arguments_obj, tool_names
from agentkiln.engine.chat.tool_parsers.base import ParsedOutput, ToolParser, new_call_id

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

_CALL_RE = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


def format_tool_call(name: str, arguments: Any) -> str:
    payload = {"name": name, "arguments": arguments_obj(arguments)}
    return f"{TOOL_CALL_OPEN}{json.dumps(payload, ensure_ascii=False)}{TOOL_CALL_CLOSE}"


def _parse_one(body: str, known: set[str]) -> ToolCall:
    obj = json.loads(body.strip())
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise TypeError("tool call must be a JSON object with a string 'name'")
    name = obj["name"]
    if name not in known:
        raise ValueError(f"unknown tool {name!r}")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        args = json.loads(args) if args.strip() else {}
    if not isinstance(args, dict):
        raise TypeError("tool call 'arguments' must be a JSON object")
    return ToolCall(id=new_call_id(), name=name, arguments=json.dumps(args, ensure_ascii=False))


def parse_tool_calls(text: str, tools: list[dict[str, Any]] | None) -> ParsedOutput:
    """Split generated text into visible text and tool calls.

    Without tools in the request the text is returned as is (the model was never told the
    syntax). Any malformed call makes the whole output plain text with `parse_error` set, so
    the caller can attribute the failure instead of executing half of the calls.
    """
    if not tools or TOOL_CALL_OPEN not in text:
        return ParsedOutput(text=text)
    known = tool_names(tools)
    calls: list[ToolCall] = []
    try:
        for match in _CALL_RE.finditer(text):
            calls.append(_parse_one(match.group(1), known))
        rest = _CALL_RE.sub("", text)
        if TOOL_CALL_OPEN in rest:
            raise ValueError(f"unclosed {TOOL_CALL_OPEN}")
    except (ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
        return ParsedOutput(text=text, parse_error=f"malformed tool call: {exc}")
    visible = re.sub(r"\n{2,}", "\n", rest).strip()
    return ParsedOutput(text=visible, tool_calls=calls)


class HermesToolParser(ToolParser):
    open_marker = TOOL_CALL_OPEN

    def parse(self, text: str, tools: list[dict[str, Any]] | None) -> ParsedOutput:
        return parse_tool_calls(text, tools)

    def format_call(self, name: str, arguments: Any) -> str:
        return format_tool_call(name, arguments)
