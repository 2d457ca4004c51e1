"""What the examples share: the arithmetic tool, the task shape and the reward.

A task is `{"question": "What is 17 * 23?", "answer": "391"}` (a bare string is a question
with no known answer). The reward is 1.0 when the final text contains the answer.
"""

from __future__ import annotations

import ast
import operator
import re
from typing import Any

import agentkiln as kiln

SYSTEM_PROMPT = "You solve arithmetic questions. Use the calculate tool, then state the result."

_OPS: dict[type, Any] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.Mod: operator.mod,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left), _eval(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.operand))
    raise ValueError(f"unsupported expression element {type(node).__name__}")


@kiln.tool
def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression such as '17 * 23' and return the result."""
    value = _eval(ast.parse(expression, mode="eval").body)  # errors become kiln.ToolError via @kiln.tool
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def question(task: Any) -> str:
    return task["question"] if isinstance(task, dict) else str(task)


def score(text: str | None, task: Any) -> float:
    """1.0 when the expected answer appears as a whole number/word in the final text."""
    if not isinstance(task, dict) or "answer" not in task or not text:
        return 0.0
    return 1.0 if re.search(rf"(?<![\w.]){re.escape(str(task['answer']))}(?![\w]|\.\d)", text) else 0.0
