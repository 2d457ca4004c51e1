"""A plain `openai` SDK tool loop: the model calls `calculate` until it can answer.

The only AgentKiln touch is the base URL: `llm.for_agent("solver").base_url` is this attempt's
gateway route with the agent's name in it, so each call is recorded (token ids, logprobs) as the
"solver" agent. Run: `kiln run examples.openai_sdk_agent:agent --server http://127.0.0.1:4747`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from openai import OpenAI

import agentkiln as kiln
from examples.common import SYSTEM_PROMPT, calculate, question, score

log = logging.getLogger(__name__)

MAX_TURNS = 6
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "calculate",
            "description": "Evaluate an arithmetic expression such as '17 * 23'.",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string"}},
                "required": ["expression"],
            },
        },
    }
]


def solve(client: OpenAI, model: str, text: str, **sampling: Any) -> str:
    """Standard chat-completions tool loop; returns the model's final text."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": text},
    ]
    for _ in range(MAX_TURNS):
        reply = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, **sampling)
        msg = reply.choices[0].message
        messages.append(msg.model_dump(exclude_none=True))
        if not msg.tool_calls:
            return msg.content or ""
        for call in msg.tool_calls:
            args = json.loads(call.function.arguments)  # malformed JSON -> failure kind parse_error
            result = calculate(**args)  # a failing tool -> failure kind tool_error
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    raise kiln.LoopDetected(f"no answer after {MAX_TURNS} turns")


@kiln.rollout
def agent(task: Any, llm: kiln.LLMHandle) -> float:
    solver = llm.for_agent("solver")
    client = OpenAI(base_url=solver.base_url, api_key=solver.api_key, max_retries=1)
    answer = solve(client, llm.model, question(task), **llm.sampling)
    log.info("solver answered %r", answer)
    return score(answer, task)
