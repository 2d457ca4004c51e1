"""The recorded LLM calls of a run as OpenAI chat messages: what text-level exports start from.

Token-level exports (JSONL, verl's tensors) read the recorded token ids; a trainer that applies
its own chat template (LLaMA-Factory) or samples its own rollouts from prompts (verl's
RLHFDataset) needs the messages instead. Each call's request is stored normalised as chat
messages for both APIs (`engine.base.ChatRequest`); only the reply differs by API, so it is
read here once for both.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

from agentkiln.adapter.credit import final_reward, group_key, reward_events
from agentkiln.adapter.transitions import latest_attempt
from agentkiln.models import Attempt, AttemptStatus, Rollout, Span
from agentkiln.protocol import LLMCall, SpanNames

TEXT_PARTS = ("text", "input_text", "output_text")


class RunCalls(NamedTuple):
    """The selected LLM calls of one rollout's succeeded attempt, in the order they were made, with
    the attempt's final reward (None: it emitted none) and its GRPO group (`credit.group_key`)."""

    rollout: Rollout
    calls: list[LLMCall]
    reward: float | None
    group: str


def text_of(content: Any) -> str:
    """Message content as plain text: a string as is, the text parts of a list joined, None as "".

    As `engine.chat.messages.content_text`, which the adapter may not import (engine is below it)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type", "text") in TEXT_PARTS
        )
    return str(content)


def request_messages(call: LLMCall) -> list[dict[str, Any]]:
    messages = call.request.get("messages")
    return [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []


def request_tools(call: LLMCall) -> list[dict[str, Any]]:
    tools = call.request.get("tools")
    return [t for t in tools if isinstance(t, dict)] if isinstance(tools, list) else []


def reply_message(call: LLMCall) -> dict[str, Any] | None:
    """The assistant message the call answered with (chat completions or responses body); None if not recorded."""
    body = call.response
    if not isinstance(body, dict):
        return None
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        msg = choices[0].get("message")
        return msg if isinstance(msg, dict) else None
    output = body.get("output")
    if not isinstance(output, list):
        return None
    text, calls = [], []
    for item in output:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            text.append(text_of(item.get("content")))
        elif item.get("type") == "function_call":
            fn = {"name": item.get("name", ""), "arguments": item.get("arguments", "")}
            calls.append({"id": item.get("call_id"), "type": "function", "function": fn})
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
    if calls:
        msg["tool_calls"] = calls
    return msg


def run_calls(
    rollout: Rollout, attempts: Sequence[Attempt], spans: Sequence[Span], agent_match: str | None = None
) -> RunCalls | None:
    """The rollout's calls as training reads them (latest attempt, succeeded; agent regex); None if unusable."""
    chosen = latest_attempt(rollout, attempts)
    if chosen is None or chosen.status != AttemptStatus.succeeded:
        return None
    agent_re = re.compile(agent_match) if agent_match is not None else None
    own = sorted((s for s in spans if s.attempt_id == chosen.attempt_id), key=lambda s: (s.sequence_id, s.start_time))
    calls = [LLMCall.from_span(s) for s in own if s.name == SpanNames.llm_call]
    if agent_re is not None:
        calls = [c for c in calls if c.agent is not None and agent_re.search(c.agent)]
    return RunCalls(rollout, calls, final_reward(reward_events(own, None)), group_key(rollout))
