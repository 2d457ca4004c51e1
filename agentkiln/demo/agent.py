"""The demo agent: plain `openai` SDK code with a calculator tool, unchanged by AgentKiln.

The only AgentKiln touch is the decorator: the runner hands it an LLM handle whose
base_url points at the gateway for this rollout, so every call is recorded.
"""

from __future__ import annotations

import json
import re
from typing import Any

from openai import OpenAI

from agentkiln.demo.calculator import CalculatorError, evaluate, format_number

SYSTEM_PROMPT = (
    "You are a math assistant. Always use the calculator tool to compute. "
    "When you get the tool result, reply with the final number only."
)

CALCULATOR_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression such as '12 * 7'.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "the arithmetic expression"}},
            "required": ["expression"],
        },
    },
}

# One worked example in the conversation: the model copies formats far better than it follows instructions.
FEW_SHOT: list[dict[str, Any]] = [
    {"role": "user", "content": "What is 15 + 27?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_example",
                "type": "function",
                "function": {"name": "calculator", "arguments": json.dumps({"expression": "15 + 27"})},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_example", "content": "42"},
    {"role": "assistant", "content": "42"},
]

MAX_TURNS = 3


def last_number(text: str | None) -> int | None:
    found = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text or "")
    if not found:
        return None
    try:
        value = float(found[-1].replace(",", ""))
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def solve(client: OpenAI, model: str, question: str, *, temperature: float, max_tokens: int = 48) -> str | None:
    """Run the tool loop; returns the model's final text (None if it never answered)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT}, *FEW_SHOT]
    messages.append({"role": "user", "content": question})
    for _ in range(MAX_TURNS):
        reply = client.chat.completions.create(
            model=model, messages=messages, tools=[CALCULATOR_TOOL], temperature=temperature, max_tokens=max_tokens
        )
        message = reply.choices[0].message
        if not message.tool_calls:
            return message.content
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            try:
                expression = json.loads(call.function.arguments).get("expression", "")
                result = format_number(evaluate(str(expression)))
            except (CalculatorError, json.JSONDecodeError, AttributeError, TypeError) as exc:
                result = f"error: {exc}"
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    return None


def score(task: dict[str, Any], final_text: str | None) -> float:
    return 1.0 if last_number(final_text) == int(task["answer"]) else 0.0


def calculator_agent(task: dict[str, Any], llm: Any, rollout: Any) -> float:
    """Kiln entry point: sample during training, answer greedily during validation."""
    client = OpenAI(base_url=llm.base_url, api_key=llm.api_key, max_retries=2, timeout=300)
    mode = getattr(rollout.mode, "value", rollout.mode)
    temperature = 0.0 if mode in ("val", "test") else float(llm.sampling.get("temperature", 1.0))
    final = solve(client, llm.model, task["question"], temperature=temperature)
    return score(task, final)
