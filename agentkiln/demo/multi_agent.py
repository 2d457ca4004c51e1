"""The multi-agent demo: a planner and an answerer split the calculator task, plain `openai` SDK code.

The planner reads the question and writes the arithmetic expression; the calculator (plain
Python) evaluates it; the answerer reads the question and the calculator's result and replies
with the final number. Each agent calls the gateway under its own name (`llm.for_agent(...)`),
so `GRPO(agents=["planner", "answerer"])` trains one LoRA per agent, and each agent's share of
the outcome is emitted as a reward named after it, so that with `agent_rewards` each LoRA learns
from its own part:

* planner: its expression evaluates to the right answer;
* answerer: its reply is the number it was given (the calculator's result; when the calculator
  failed, the right answer), written as the number alone, as its prompt asks.

The rollout's reward (what validation accuracy and train reward report) is whether the final
reply is the right answer. Prompts are short and replies a few tokens, so a step samples fast.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from openai import OpenAI

from agentkiln.demo.calculator import CalculatorError, evaluate, format_number
from agentkiln.runner.emit import emit_reward

PLANNER = "planner"
ANSWERER = "answerer"
AGENTS = (PLANNER, ANSWERER)

PLANNER_PROMPT = "Write the arithmetic expression that answers the question. Reply with the expression only."
ANSWERER_PROMPT = "Report the calculator's result. Reply with the final number only."

# (question, expression, answer): worked examples, since a small model copies formats far better
# than it follows instructions. The same three the single-agent calculator demo shows.
EXAMPLES: list[tuple[str, str, int]] = [
    ("What is 15 + 27?", "15 + 27", 42),
    ("Ana has 120 coins and gives away 45. How many coins are left?", "120 - 45", 75),
    ("There are 12 boxes with 9 pens in each. How many pens are there?", "12 * 9", 108),
]

PLANNER_MAX_TOKENS = 16
ANSWERER_MAX_TOKENS = 8

_NUMBER_ONLY = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*\.?\s*")


def answerer_input(question: str, result: str | None) -> str:
    return f"Question: {question}\nCalculator result: {result if result is not None else 'error'}"


def planner_messages(question: str, shots: int = len(EXAMPLES)) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": PLANNER_PROMPT}]
    for q, expression, _ in EXAMPLES[:shots]:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": expression}]
    return messages + [{"role": "user", "content": question}]


def answerer_messages(question: str, result: str | None, shots: int = len(EXAMPLES)) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": ANSWERER_PROMPT}]
    for q, _, answer in EXAMPLES[:shots]:
        messages += [
            {"role": "user", "content": answerer_input(q, str(answer))},
            {"role": "assistant", "content": str(answer)},
        ]
    return messages + [{"role": "user", "content": answerer_input(question, result)}]


def expression_of(reply: str | None) -> str:
    """The planner's expression: its first line, up to an '=' it may go on to write."""
    line = (reply or "").strip().splitlines()[0] if (reply or "").strip() else ""
    return line.split("=")[0].strip().strip("`").strip()


def calculate(expression: str) -> str | None:
    """The calculator's result as text, None when the expression does not evaluate."""
    try:
        return format_number(evaluate(expression)) if expression else None
    except (CalculatorError, TypeError, ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None


def number_only(reply: str | None) -> float | None:
    """The number a reply consists of (a trailing period allowed), None when it is anything more."""
    match = _NUMBER_ONLY.fullmatch(reply or "")
    return float(match.group(1)) if match else None


@dataclass
class TeamOutcome:
    """One run of the team and each agent's share of it."""

    expression: str
    result: str | None
    reply: str | None
    planner: float  # the expression evaluates to the answer
    answerer: float  # the reply is exactly the number it had to report
    correct: float  # the reply is the right answer

    def rewards(self) -> dict[str, float]:
        return {PLANNER: self.planner, ANSWERER: self.answerer}


def score(task: dict[str, Any], expression: str, result: str | None, reply: str | None) -> TeamOutcome:
    answer = float(task["answer"])
    given = float(result) if result is not None else answer
    reported = number_only(reply)
    return TeamOutcome(
        expression=expression,
        result=result,
        reply=reply,
        planner=1.0 if result is not None and float(result) == answer else 0.0,
        answerer=1.0 if reported is not None and reported == given else 0.0,
        correct=1.0 if reported is not None and reported == answer else 0.0,
    )


def run_team(
    planner: OpenAI, answerer: OpenAI, model: str, task: dict[str, Any], *, temperature: float
) -> TeamOutcome:
    """Planner -> calculator -> answerer on one task."""
    question = task["question"]
    plan = planner.chat.completions.create(
        model=model, messages=planner_messages(question), temperature=temperature, max_tokens=PLANNER_MAX_TOKENS
    )
    expression = expression_of(plan.choices[0].message.content)
    result = calculate(expression)
    reply = answerer.chat.completions.create(
        model=model,
        messages=answerer_messages(question, result),
        temperature=temperature,
        max_tokens=ANSWERER_MAX_TOKENS,
    )
    return score(task, expression, result, reply.choices[0].message.content)


def _client(handle: Any) -> OpenAI:
    return OpenAI(base_url=handle.base_url, api_key=handle.api_key, max_retries=2, timeout=300)


def planner_answerer_agent(task: dict[str, Any], llm: Any, rollout: Any) -> float:
    """Kiln entry point: each agent's share is emitted as a reward named after it; the return
    value (the rollout's reward) is whether the final reply is right. Greedy in validation."""
    mode = getattr(rollout.mode, "value", rollout.mode)
    temperature = 0.0 if mode in ("val", "test") else float(llm.sampling.get("temperature", 0.7))
    outcome = run_team(
        _client(llm.for_agent(PLANNER)), _client(llm.for_agent(ANSWERER)), llm.model, task, temperature=temperature
    )
    for agent, value in outcome.rewards().items():
        emit_reward(value, name=agent)
    return outcome.correct
