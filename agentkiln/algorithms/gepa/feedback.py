"""The reflective dataset: one record per rollout, read from its recorded trace.

A record holds the task, every LLM call of the latest attempt (the messages sent, the reply,
the tool calls it made), the tools that ran and how they failed, the attempt's error and the
reward, so the reflection LM sees what the agent did with the prompt, not only its score.
"""

from __future__ import annotations

import json
from typing import Any

from agentkiln.algorithms.apo.prompts import attempt_error
from agentkiln.protocol import LLMCall, SpanAttrs, SpanNames
from agentkiln.training.trace import Trace


def _cut(value: Any, max_chars: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= max_chars else text[:max_chars] + " [...]"


def _message(m: dict[str, Any], max_chars: int) -> str:
    content = m.get("content")
    if isinstance(content, list):  # content parts: keep the text ones
        content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    calls = [
        f"{(c.get('function') or {}).get('name')}({(c.get('function') or {}).get('arguments')})"
        for c in m.get("tool_calls") or []
        if isinstance(c, dict)
    ]
    text = content or ("tool call: " + ", ".join(calls) if calls else "")
    return f"{m.get('role', '?')}: {_cut(text or '', max_chars)}"


def _call(call: LLMCall, max_chars: int) -> dict[str, Any]:
    content, tool_calls = call.reply() if call.response is not None else (None, [])
    out: dict[str, Any] = {"Messages": [_message(m, max_chars) for m in call.messages]}
    out["Reply"] = _cut(content or "", max_chars) if content or not tool_calls else "(tool calls only)"
    if tool_calls:
        out["Tool calls"] = [f"{name}({_cut(args, max_chars)})" for name, args in tool_calls]
    if call.parse_error:
        out["Parse error"] = _cut(call.parse_error, max_chars)
    return out


def _tool(span: Any, max_chars: int) -> str:
    attrs = span.attributes or {}
    line = f"{attrs.get(SpanAttrs.tool_name, '?')}({_cut(attrs.get(SpanAttrs.tool_arguments, ''), max_chars)})"
    failed = span.status is not None and span.status.code == "ERROR"
    if failed:
        why = attrs.get(SpanAttrs.exception_message) or attrs.get(SpanAttrs.failure_kind) or "error"
        line += f" -> failed: {_cut(why, max_chars)}"
    return line


def trace_record(trace: Trace, success_reward: float = 1.0, max_chars: int = 600, max_calls: int = 6) -> dict[str, Any]:
    """The reflective-dataset record of one rollout (JSON-serializable, markdown-rendered by gepa)."""
    spans = sorted(trace.latest_spans(), key=lambda s: s.sequence_id)
    calls = [LLMCall.from_span(s) for s in spans if s.name == SpanNames.llm_call]
    tools = [_tool(s, max_chars) for s in spans if s.name == SpanNames.tool]
    error = attempt_error(trace)
    reward = trace.reward
    record: dict[str, Any] = {"Task": _cut(trace.rollout.input, max_chars)}
    if calls:
        # The last calls matter most (the final answer); the first keeps the prompt as the agent saw it.
        shown = calls if len(calls) <= max_calls else [calls[0], *calls[-(max_calls - 1) :]]
        record["LLM calls"] = [_call(c, max_chars) for c in shown]
    if tools:
        record["Tools run"] = tools
    if error:
        record["Error"] = _cut(error, max_chars)
    record["Reward"] = f"{reward:g}"
    verdict = "succeeded" if reward >= success_reward else "failed"
    record["Feedback"] = f"The agent {verdict} with reward {reward:g}" + (
        f"; the run raised: {_cut(error, max_chars)}" if error else "."
    )
    return record
