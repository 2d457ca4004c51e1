"""The demo agent: plain `openai` SDK code with a calculator tool, unchanged by AgentKiln.

AgentKiln's only touch is the `llm` handle the runner passes in: its base_url points at the
gateway route of this rollout/attempt, so every call is recorded for training.
"""

from __future__ import annotations

import json
import re
from typing import Any

from openai import OpenAI

from agentkiln.demo.calculator import CalculatorError, evaluate, format_number

SYSTEM_PROMPT = "You are a math assistant. Use the calculator tool, then reply with the final number only."

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



def _worked_example(question: str, expression: str, answer: int, call_id: str) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": question},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "calculator", "arguments": json.dumps({"expression": expression})},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": str(answer)},
        {"role": "assistant", "content": str(answer)},
    ]


# Worked examples in the conversation: a small model copies formats far better than it follows
# instructions. Untrained, it still often answers from its (weak) mental arithmetic instead.
FEW_SHOT: list[dict[str, Any]] = [
    *_worked_example("What is 15 + 27?", "15 + 27", 42, "call_1"),
    *_worked_example("Ana has 120 coins and gives away 45. How many coins are left?", "120 - 45", 75, "call_2"),
    *_worked_example("There are 12 boxes with 9 pens in each. How many pens are there?", "12 * 9", 108, "call_3"),
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


def solve(
    client: OpenAI,
    model: str,
    question: str,
    *,
    temperature: float,
    max_tokens: int = 48,
    system_prompt: str = SYSTEM_PROMPT,
) -> str | None:
    """Run the tool loop; returns the model's final text (None if it never answered)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system_prompt}, *FEW_SHOT]
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


def calculator_agent(task: dict[str, Any], llm: Any, rollout: Any, prompts: dict[str, Any] | None = None) -> float:
    """Kiln entry point: sample during training, answer greedily during validation.

    A published prompts["system"] (e.g. from APO) replaces the built-in system prompt.
    """
    client = OpenAI(base_url=llm.base_url, api_key=llm.api_key, max_retries=2, timeout=300)
    mode = getattr(rollout.mode, "value", rollout.mode)
    temperature = 0.0 if mode in ("val", "test") else float(llm.sampling.get("temperature", 0.7))
    system = prompts["system"].format() if prompts and "system" in prompts else SYSTEM_PROMPT
    final = solve(client, llm.model, task["question"], temperature=temperature, system_prompt=system)
    return score(task, final)
