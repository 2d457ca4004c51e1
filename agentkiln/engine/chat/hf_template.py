"""The default chat template: the model's own Jinja template (`tokenizer.apply_chat_template`).

Any model folder whose tokenizer ships a chat template gets prompts in the format it was trained
on, tools included (templates that take `tools=`). OpenAI messages are normalised first: content
parts become text, `developer` becomes `system`, and history tool-call arguments become JSON
objects (what templates index into). Calls are read back with the family's tool parser
(Hermes `<tool_call>` JSON by default).
"""

from __future__ import annotations

import logging
from typing import Any

from agentkiln.engine.chat.messages import arguments_obj, content_text, tool_function
from agentkiln.engine.chat.template import ChatTemplate, RenderedPrompt

log = logging.getLogger(__name__)


def _hf_message(msg: dict[str, Any]) -> dict[str, Any]:
    role = msg.get("role") or "user"
    out: dict[str, Any] = {
        "role": "system" if role == "developer" else "tool" if role == "function" else role,
        "content": content_text(msg.get("content")),
    }
    for key in ("name", "tool_call_id"):
        if msg.get(key):
            out[key] = msg[key]
    calls = []
    for call in msg.get("tool_calls") or []:
        fn = call.get("function", call)
        entry = {
            "type": "function",
            "function": {"name": fn.get("name", ""), "arguments": arguments_obj(fn.get("arguments"))},
        }
        if call.get("id"):
            entry["id"] = call["id"]
        calls.append(entry)
    if calls:
        out["tool_calls"] = calls
    return out


class HFChatTemplate(ChatTemplate):
    """Renders with the tokenizer's own chat template; ids are the rendered text tokenized as is."""

    name = "hf"

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> RenderedPrompt:
        hf_tools = [{"type": "function", "function": tool_function(t)} for t in tools] if tools else None
        text = self.tokenizer.apply_chat_template(
            [_hf_message(m) for m in messages], tools=hf_tools, add_generation_prompt=True, tokenize=False
        )
        # The template already wrote BOS etc. as text; tokenizing must not add them twice.
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return RenderedPrompt(text=text, ids=list(ids))
