"""Locally generated arithmetic and word-problem tasks (no data set download).

Tasks are deterministic for a seed so before/after accuracies compare like with like.
"""

from __future__ import annotations

import random
from typing import Any

_WORD_TEMPLATES: list[tuple[str, str]] = [
    ("{name} has {a} apples and buys {b} more. How many apples does {name} have now?", "+"),
    ("A shop sold {a} books in the morning and {b} in the afternoon. How many books did it sell?", "+"),
    ("{name} had {a} coins and gave away {b}. How many coins are left?", "-"),
    ("A train carries {a} people and {b} get off. How many people are still on the train?", "-"),
    ("There are {a} boxes with {b} pens in each. How many pens are there in total?", "*"),
    ("{name} reads {b} pages a day for {a} days. How many pages does {name} read?", "*"),
]
_NAMES = ["Tom", "Ana", "Li", "Sara", "Omar", "Mia", "Ken", "Zoe"]


def _numbers(rng: random.Random, op: str) -> tuple[int, int]:
    if op == "*":
        return rng.randint(11, 49), rng.randint(3, 19)
    a, b = rng.randint(20, 999), rng.randint(10, 499)
    if op == "-" and b > a:
        a, b = b, a
    return a, b


def _answer(a: int, b: int, op: str) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def make_task(rng: random.Random, task_id: str) -> dict[str, Any]:
    """One task: a question and its integer answer; half plain arithmetic, half word problems."""
    if rng.random() < 0.5:
        op = rng.choice("+-*")
        a, b = _numbers(rng, op)
        question = f"What is {a} {op} {b}?"
    else:
        template, op = rng.choice(_WORD_TEMPLATES)
        a, b = _numbers(rng, op)
        question = template.format(a=a, b=b, name=rng.choice(_NAMES))
    return {"id": task_id, "question": question, "answer": _answer(a, b, op)}


def make_tasks(n: int, *, seed: int, prefix: str = "t") -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [make_task(rng, f"{prefix}{i}") for i in range(n)]
