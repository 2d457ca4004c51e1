"""Recorded runs for the export tests: token ids as the adapter reads them plus the chat request/response
the gateway records, with a tool call. No model: ids are made up, only their layout matters."""

from __future__ import annotations

import json
from typing import Any

from agentkiln.models import Attempt, AttemptStatus, Rollout, RolloutMode, Span
from agentkiln.protocol import SpanAttrs, SpanNames
from agentkiln.training.trace import Trace

SYSTEM = "You are a calculator agent."
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two numbers",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                "required": ["a", "b"],
            },
        },
    }
]
TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}


def chat_body(content: str | None, tool_calls: list[dict] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return {"object": "chat.completion", "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]}


def llm(
    rid: str,
    seq: int,
    messages: list[dict],
    body: dict,
    prompt: list[int],
    resp: list[int],
    *,
    tools: list[dict] | None = None,
    agent: str = "solver",
    api: str = "chat.completions",
    temperature: float = 0.7,
) -> Span:
    return Span(
        rollout_id=rid,
        attempt_id=f"{rid}-a",
        name=SpanNames.llm_call,
        sequence_id=seq,
        attributes={
            SpanAttrs.request: {"messages": messages, "tools": tools or [], "temperature": temperature},
            SpanAttrs.response: body,
            SpanAttrs.api: api,
            SpanAttrs.prompt_token_ids: prompt,
            SpanAttrs.response_token_ids: resp,
            SpanAttrs.response_logprobs: [-0.5 - 0.1 * i for i in range(len(resp))],
            SpanAttrs.agent_name: agent,
            SpanAttrs.finish_reason: "stop",
            SpanAttrs.model_version: "v1",
            SpanAttrs.temperature: temperature,
        },
    )


def reward(rid: str, seq: int, value: float) -> Span:
    return Span(
        rollout_id=rid,
        attempt_id=f"{rid}-a",
        name=SpanNames.reward,
        sequence_id=seq,
        attributes={SpanAttrs.reward_value: value, SpanAttrs.reward_final: True},
    )


def trace(rid: str, spans: list[Span], *, group: str, task: dict, status=AttemptStatus.succeeded) -> Trace:
    rollout = Rollout(rollout_id=rid, input=task, metadata={"group_id": group}, mode=RolloutMode.train)
    return Trace(rollout, [Attempt(attempt_id=f"{rid}-a", rollout_id=rid, sequence_id=1, status=status)], spans)


def tool_run(rid: str, answer: str, answer_ids: list[int], value: float) -> Trace:
    """Ask, call the `add` tool, read its result, answer: two LLM calls, the second continuing the first."""
    start = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2 + 3?"}]
    after_tool = start + [
        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    return trace(
        rid,
        [
            llm(rid, 1, start, chat_body(None, [TOOL_CALL]), [1, 2, 3], [10, 11], tools=TOOLS),
            llm(rid, 2, after_tool, chat_body(answer), [1, 2, 3, 10, 11, 20], answer_ids, tools=TOOLS),
            reward(rid, 3, value),
        ],
        group="g-add",
        task={"question": "What is 2 + 3?", "answer": "5"},
    )


def responses_run(rid: str) -> Trace:
    """One call through the responses API (its body is `output` items, not `choices`)."""
    body = {
        "object": "response",
        "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Paris"}]}],
    }
    messages = [{"role": "user", "content": [{"type": "input_text", "text": "Capital of France?"}]}]
    return trace(
        rid,
        [llm(rid, 1, messages, body, [7, 8, 9, 4], [40, 41, 42], api="responses"), reward(rid, 2, 0.5)],
        group="g-capital",
        task={"question": "Capital of France?"},
    )


def runs() -> list[Trace]:
    """g-add: a right (reward 1) and a wrong (0) answer after the same tool call; g-capital: one run; a failed run."""
    failed = trace(
        "r-failed",
        [llm("r-failed", 1, [{"role": "user", "content": "x"}], chat_body("y"), [1], [2])],
        group="g-other",
        task={"question": "x"},
        status=AttemptStatus.failed,
    )
    return [
        tool_run("r-right", "5", [30], 1.0),
        tool_run("r-wrong", "6", [31, 32], 0.0),
        responses_run("r-resp"),
        failed,
    ]


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


async def fill_store(url: str, traces: list[Trace]) -> None:
    """Write `traces` into a store (new rollout/attempt ids; spans in their order) for the CLI tests."""
    from agentkiln.models import SpanIn
    from agentkiln.store import open_store

    store = open_store(url)
    try:
        for t in traces:
            ar = await store.start_rollout(t.rollout.input, mode=t.rollout.mode, metadata=t.rollout.metadata)
            rid, aid = ar.rollout.rollout_id, ar.attempt.attempt_id
            await store.add_spans(
                [
                    SpanIn(rollout_id=rid, attempt_id=aid, name=s.name, attributes=s.attributes)
                    for s in sorted(t.spans, key=lambda s: s.sequence_id)
                ]
            )
            await store.update_attempt(rid, aid, status=t.attempts[0].status)
    finally:
        await store.close()
