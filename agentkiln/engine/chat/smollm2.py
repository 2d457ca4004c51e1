"""SmolLM2's prompt format: ChatML, tools described compactly in the system prompt, Hermes-style calls.

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
from typing import Any

from agentkiln.engine.chat.messages import content_text, tool_function
from agentkiln.engine.chat.template import ChatTemplate, RenderedPrompt
from agentkiln.engine.chat.tool_parsers.hermes import format_tool_call

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# Kept short on purpose: a 135M model follows a compact instruction plus in-context examples
# far better than a long one, and every prompt token costs training time.
_TOOL_INSTRUCTIONS = (
    "Tools:\n{tools}\n"
    'To use a tool, reply only with <tool_call>{{"name": "<tool name>", "arguments": {{<JSON arguments>}}}}</tool_call>'
)


def tools_system_text(tools: list[dict[str, Any]]) -> str:
    lines = "\n".join(json.dumps(tool_function(t), ensure_ascii=False) for t in tools)
    return _TOOL_INSTRUCTIONS.format(tools=lines)


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


def chat_turns(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, default_system: str = DEFAULT_SYSTEM
) -> list[tuple[str, str]]:
    """(role, text) turns in ChatML roles: system first, consecutive tool results merged into one user turn."""
    turns: list[tuple[str, str]] = []
    msgs = list(messages)
    if msgs and msgs[0].get("role") in ("system", "developer"):
        system = content_text(msgs.pop(0).get("content"))
    else:
        system = default_system
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
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    default_system: str = DEFAULT_SYSTEM,
) -> RenderedPrompt:
    """ChatML text plus token ids, with the assistant generation prompt appended."""
    start_id = tokenizer.convert_tokens_to_ids(IM_START)
    end_id = tokenizer.convert_tokens_to_ids(IM_END)
    text_parts: list[str] = []
    ids: list[int] = []

    def plain(s: str) -> None:
        text_parts.append(s)
        ids.extend(tokenizer(s, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    for role, body in chat_turns(messages, tools, default_system):
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


class ChatMLTemplate(ChatTemplate):
    """ChatML with tools in the system prompt; `default_system` fills in when the caller sends none."""

    name = "chatml"

    def __init__(self, tokenizer: Any, default_system: str = "", **kw: Any) -> None:
        super().__init__(tokenizer, **kw)
        self.default_system = default_system

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> RenderedPrompt:
        return render_prompt(self.tokenizer, messages, tools or None, self.default_system)


class SmolLM2Template(ChatMLTemplate):
    """What SmolLM2-Instruct was trained on, plus its default system prompt."""

    name = "smollm2"

    def __init__(self, tokenizer: Any, **kw: Any) -> None:
        super().__init__(tokenizer, default_system=DEFAULT_SYSTEM, **kw)


def is_smollm2(tokenizer: Any, names: list[str]) -> bool:
    """SmolLM2 (or a model with its tokenizer, like the tiny test model): its template names SmolLM."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and "SmolLM" in template:
        return True
    return any("smollm" in n.lower() for n in names if n)
