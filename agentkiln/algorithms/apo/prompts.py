"""APO's text side: the optimizer LLM's prompts, template placeholders, and the failures it is shown.

Kept apart from the search loop (`algorithm`) because all of it is pure text handling that
the loop, tests and tools use without a server.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agentkiln.models import PromptTemplate
from agentkiln.protocol import LLMCall, SpanNames
from agentkiln.training.trace import Trace

CRITIQUE_SYSTEM = "You review instructions given to an AI agent and explain briefly why the agent failed."
CRITIQUE_USER = """The agent was given this prompt:
<prompt>
{prompt}
</prompt>

It failed on these tasks:
{failures}

In a few sentences, say what is wrong or missing in the prompt that caused these failures."""

REWRITE_SYSTEM = (
    "You improve instructions given to an AI agent. Reply with the new prompt only, inside <prompt></prompt>."
)
REWRITE_USER = """Current prompt:
<prompt>
{prompt}
</prompt>

Feedback on the prompt:
{critique}

Write an improved prompt that fixes these problems.{placeholder_rule}
Reply with the new prompt only, inside <prompt></prompt>."""


# --------------------------------------------------------------------------- templates


def placeholders(template: PromptTemplate) -> set[str]:
    """Names a template is formatted with; raises ValueError on a malformed template."""
    if template.engine == "jinja":
        import jinja2
        from jinja2 import meta

        try:
            return set(meta.find_undeclared_variables(jinja2.Environment().parse(template.template)))
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(str(exc)) from exc
    names = set()
    for _, name, _, _ in string.Formatter().parse(template.template):
        if name is not None:
            if name == "" or name.isdigit():
                raise ValueError("positional {} fields are not allowed")
            names.add(re.split(r"[.\[]", name, maxsplit=1)[0])
    return names


def check_candidate(candidate: PromptTemplate, original: PromptTemplate, max_chars: int) -> str | None:
    """Why a rewrite is unusable (None = usable): empty, too long, broken, or placeholders changed."""
    text = candidate.template.strip()
    if not text:
        return "empty prompt"
    if len(text) > max_chars:
        return f"longer than {max_chars} characters"
    try:
        got, want = placeholders(candidate), placeholders(original)
    except ValueError as exc:
        return f"malformed template: {exc}"
    if got != want:
        return f"placeholders {sorted(got)} differ from {sorted(want)}"
    return None


def placeholder_rule(template: PromptTemplate) -> str:
    """The sentence telling an optimizer LLM which placeholders a rewrite must keep."""
    names = sorted(placeholders(template))
    if not names:
        return " Do not use curly braces."
    return " Keep these placeholders exactly, written in braces: " + ", ".join("{" + n + "}" for n in names) + "."


def extract_prompt(text: str) -> str:
    """The prompt inside <prompt>...</prompt>, else the reply without code fences (small models forget tags)."""
    found = re.findall(r"<prompt>\s*(.*?)\s*(?:</prompt>|$)", text or "", flags=re.DOTALL | re.IGNORECASE)
    if found and found[-1].strip():
        return found[-1].strip()
    return re.sub(r"^```\w*\n?|\n?```$", "", (text or "").strip()).strip()


@dataclass
class Failure:
    task: Any
    answer: str | None
    reward: float
    error: str | None = None


def final_answer(trace: Trace) -> str | None:
    """Text of the last LLM reply of the rollout's latest attempt (tool calls rendered as calls)."""
    calls = [s for s in trace.latest_spans() if s.name == SpanNames.llm_call]
    if not calls:
        return None
    call = LLMCall.from_span(max(calls, key=lambda s: s.sequence_id))
    return call.reply_text() if call.response is not None else None


def attempt_error(trace: Trace) -> str | None:
    """The error message of the rollout's latest attempt (None: it did not fail)."""
    attempt = trace.latest_attempt
    return attempt.error.message if attempt is not None and attempt.error is not None else None


def collect_failures(traces: Sequence[Trace], success_reward: float) -> list[Failure]:
    return [
        Failure(task=t.rollout.input, answer=final_answer(t), reward=t.reward, error=attempt_error(t))
        for t in traces
        if t.reward < success_reward
    ]


def render_failures(failures: Sequence[Failure], max_chars: int = 400) -> str:
    lines = []
    for i, f in enumerate(failures, 1):
        task = json.dumps(f.task, ensure_ascii=False, default=str)[:max_chars]
        answer = (f.answer or "(no answer)")[:max_chars]
        line = f"{i}. Task: {task}\n   Agent's answer: {answer}\n   Reward: {f.reward:g}"
        if f.error:
            line += f"\n   Error: {f.error[:max_chars]}"
        lines.append(line)
    return "\n".join(lines)
