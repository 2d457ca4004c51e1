"""OpenAI messages + tools <-> ChatML text and token ids for SmolLM2, and tool-call parsing.

SmolLM2's template knows only `<|im_start|>role\\n...<|im_end|>\\n`; it has no tool syntax.
So tools are described in the system prompt, the model is asked to answer
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, assistant tool calls from
history are rendered in that same form (so the model sees its own convention), and tool
results come back as a user turn wrapped in `<tool_response>` (a role the model was trained on).

Tokenization is done per segment: the ChatML markers become their special-token ids and
message text is tokenized with special-token parsing off, so a user typing `<|im_end|>`
cannot forge turn boundaries. For ordinary text this equals tokenizing the rendered string.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from agentkiln.engine.base import ToolCall

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

# Kept short on purpose: a 135M model follows a compact instruction plus in-context examples
# far better than a long one, and every prompt token costs training time.
_TOOL_INSTRUCTIONS = (
    "Tools:\n{tools}\n"
    'To use a tool, reply only with <tool_call>{{"name": "<tool name>", "arguments": {{<JSON arguments>}}}}</tool_call>'
)


@dataclass
class RenderedPrompt:
    """The prompt as text (for logs/spans) and as the exact token ids fed to the model."""

    text: str
    ids: list[int]


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


def _tool_function(tool: dict[str, Any]) -> dict[str, Any]:
    """Accept both `{"type": "function", "function": {...}}` and a bare function definition."""
    fn = tool.get("function", tool) if isinstance(tool, dict) else {}
    return {k: fn[k] for k in ("name", "description", "parameters") if k in fn}


def tool_names(tools: list[dict[str, Any]]) -> set[str]:
    return {fn["name"] for fn in map(_tool_function, tools) if isinstance(fn.get("name"), str)}


def tools_system_text(tools: list[dict[str, Any]]) -> str:
    lines = "\n".join(json.dumps(_tool_function(t), ensure_ascii=False) for t in tools)
    return _TOOL_INSTRUCTIONS.format(tools=lines)


def _arguments_obj(arguments: Any) -> Any:
    """History tool-call arguments are JSON text; embed them as JSON, not as an escaped string."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return arguments
    return arguments if arguments is not None else {}


def format_tool_call(name: str, arguments: Any) -> str:
    payload = {"name": name, "arguments": _arguments_obj(arguments)}
    return f"{TOOL_CALL_OPEN}{json.dumps(payload, ensure_ascii=False)}{TOOL_CALL_CLOSE}"


def _assistant_text(msg: dict[str, Any]) -> str:
    parts = [content_text(msg.get("content"))] if content_text(msg.get("content")) else []
    for call in msg.get("tool_calls") or []:
        fn = call.get("function", call)
        parts.append(format_tool_call(fn.get("name", ""), fn.get("arguments")))
    return "\n".join(parts)


def _tool_response_text(msg: dict[str, Any], call_names: dict[str, str]) -> str:
    """Names the tool (from the message or its call) but not the opaque call id, which small models copy."""
    name = msg.get("name") or call_names.get(str(msg.get("tool_call_id")))
    attrs = f' name="{name}"' if name else ""
    return f"<tool_response{attrs}>\n{content_text(msg.get('content'))}\n</tool_response>"


def chat_turns(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[tuple[str, str]]:
    """(role, text) turns in ChatML roles: system first, consecutive tool results merged into one user turn."""
    turns: list[tuple[str, str]] = []
    msgs = list(messages)
    if msgs and msgs[0].get("role") in ("system", "developer"):
        system = content_text(msgs.pop(0).get("content"))
    else:
        system = DEFAULT_SYSTEM
    if tools:
        system = f"{system}\n\n{tools_system_text(tools)}" if system else tools_system_text(tools)
    turns.append(("system", system))
    call_names: dict[str, str] = {}
    for msg in msgs:
        role = msg.get("role")
        if role in ("system", "developer"):
            turns.append(("system", content_text(msg.get("content"))))
        elif role == "assistant":
            for call in msg.get("tool_calls") or []:
                fn = call.get("function", call)
                if call.get("id") and fn.get("name"):
                    call_names[str(call["id"])] = str(fn["name"])
            turns.append(("assistant", _assistant_text(msg)))
        elif role in ("tool", "function"):
            text = _tool_response_text(msg, call_names)
            if turns and turns[-1][0] == "user" and turns[-1][1].startswith("<tool_response"):
                turns[-1] = ("user", f"{turns[-1][1]}\n{text}")
            else:
                turns.append(("user", text))
        else:
            turns.append(("user", content_text(msg.get("content"))))
    return turns


def render_prompt(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> RenderedPrompt:
    """ChatML text plus token ids, with the assistant generation prompt appended."""
    start_id = tokenizer.convert_tokens_to_ids(IM_START)
    end_id = tokenizer.convert_tokens_to_ids(IM_END)
    text_parts: list[str] = []
    ids: list[int] = []

    def plain(s: str) -> None:
        text_parts.append(s)
        ids.extend(tokenizer(s, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    for role, body in chat_turns(messages, tools):
        text_parts.append(IM_START)
        ids.append(start_id)
        plain(f"{role}\n{body}")
        text_parts.append(IM_END)
        ids.append(end_id)
        plain("\n")
    text_parts.append(IM_START)
    ids.append(start_id)
    plain("assistant\n")
    return RenderedPrompt(text="".join(text_parts), ids=ids)


@dataclass
class ParsedOutput:
    text: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    parse_error: str | None = None


_CALL_RE = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


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


def stream_visible_text(raw: str, stop: list[str], tools: bool) -> str:
    """The part of partially generated text that is safe to stream to the client now.

    Cut at a stop string or (when tools were offered) at tool-call markup, drop an incomplete
    multi-byte character, and hold back a tail that could still grow into one of those markers.
    The final ChatResult stays authoritative (tool calls arrive with it).
    """
    markers = [s for s in stop if s] + ([TOOL_CALL_OPEN] if tools else [])
    cut = min((i for i in (raw.find(m) for m in markers) if i >= 0), default=len(raw))
    text = raw[:cut].rstrip("\ufffd")
    hold = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), hold, -1):
            if text.endswith(marker[:k]):
                hold = k
                break
    return text[: len(text) - hold]
