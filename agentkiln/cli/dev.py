"""`kiln dev`: run one task through the agent against the current resources and show its trace.

The tight inner loop of agent development: no queue, no trainer. The rollout is created
already running (start_rollout) so it never reaches other runners, and it is stored like
any other, so the dashboard shows it too.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from agentkiln.cli.app import app
from agentkiln.cli.run import DEFAULT_SERVER, importable_cwd
from agentkiln.models import Attempt, Span
from agentkiln.protocol import LLMCall, SpanAttrs, SpanNames

log = logging.getLogger(__name__)


def _short(value: Any, n: int = 100) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _llm_details(span: Span) -> str:
    call = LLMCall.from_span(span)
    head = f"[{call.agent}] " if call.agent else ""
    tokens = len(call.response_ids or [])
    return f"{head}{_short(call.last_input(), 60)} → {_short(call.reply_text(), 80)} ({tokens} tok)"


def span_details(span: Span) -> str:
    a = span.attributes
    if span.name == SpanNames.llm_call:
        return _llm_details(span)
    if span.name == SpanNames.reward:
        kind = "final" if a.get(SpanAttrs.reward_final) else "intermediate"
        dims = a.get(SpanAttrs.reward_dims)
        return f"{a.get(SpanAttrs.reward_name)}={a.get(SpanAttrs.reward_value)} ({kind})" + (f" {dims}" if dims else "")
    if span.name == SpanNames.message:
        return _short(a.get(SpanAttrs.message_text, ""), 140)
    if span.name == SpanNames.object:
        return _short(a.get(SpanAttrs.object_value), 140)
    if span.name == SpanNames.exception:
        return f"{a.get(SpanAttrs.failure_kind)}: {a.get(SpanAttrs.exception_type)}: {_short(a.get(SpanAttrs.exception_message, ''), 100)}"
    if span.name == SpanNames.tool:
        return f"{a.get(SpanAttrs.tool_name)}({_short(a.get(SpanAttrs.tool_arguments), 80)})"
    return _short({k: v for k, v in a.items() if not k.startswith("otel.")}, 140)


def trace_table(spans: Sequence[Span]) -> Table:
    table = Table(title="trace", show_lines=False)
    for col, kw in (("#", {"justify": "right"}), ("t (s)", {"justify": "right"}), ("span", {}),
                    ("dur (s)", {"justify": "right"}), ("details", {"overflow": "fold"})):  # fmt: skip
        table.add_column(col, **kw)
    t0 = min((s.start_time for s in spans), default=0.0)
    for s in spans:
        dur = f"{s.end_time - s.start_time:.3f}" if s.end_time is not None else ""
        style = "red" if s.status.code == "ERROR" else ("green" if s.name == SpanNames.reward else None)
        table.add_row(str(s.sequence_id), f"{s.start_time - t0:.3f}", s.name, dur, span_details(s), style=style)
    return table


def final_reward(spans: Sequence[Span]) -> float | None:
    finals = [s for s in spans if s.name == SpanNames.reward and s.attributes.get(SpanAttrs.reward_final, True)]
    return float(finals[-1].attributes[SpanAttrs.reward_value]) if finals else None


def print_report(console: Console, attempt: Attempt, spans: Sequence[Span]) -> None:
    console.print(trace_table(spans))
    llm_calls = sum(1 for s in spans if s.name == SpanNames.llm_call)
    reward = final_reward(spans)
    console.print(
        f"rollout [bold]{attempt.rollout_id}[/] attempt {attempt.attempt_id}: [bold]{attempt.status.value}[/]"
    )
    console.print(f"LLM calls: {llm_calls}   reward: [bold]{reward if reward is not None else '-'}[/]")
    if attempt.error is not None:
        console.print(f"[red]{attempt.error.kind.value}[/]: {attempt.error.type}: {attempt.error.message}")
        if attempt.error.stack:
            console.print(attempt.error.stack, style="dim", markup=False, highlight=False)


async def dev_once(
    agent_ref: str, task: Any, server: str, *, api_key: str | None, timeout_s: float | None
) -> tuple[Attempt, list[Span]]:
    from agentkiln.models import RolloutConfig
    from agentkiln.runner.agent import import_agent
    from agentkiln.runner.runner import open_runner_store
    from agentkiln.runner.worker import RolloutWorker, WorkerConfig

    agent = import_agent(agent_ref)
    store = open_runner_store(server, api_key)
    try:
        await agent.prepare()
        ar = await store.start_rollout(task, config=RolloutConfig(timeout_s=timeout_s), metadata={"source": "kiln dev"})
        worker = RolloutWorker(agent, store, config=WorkerConfig(gateway_url=server, api_key=api_key))
        await worker.run_attempt(ar)
        attempts = await store.query_attempts(ar.rollout.rollout_id)
        attempt = next(a for a in attempts if a.attempt_id == ar.attempt.attempt_id)
        spans = await store.query_spans(ar.rollout.rollout_id, attempt_id=attempt.attempt_id)
        return attempt, spans
    finally:
        await store.close()


def parse_task(text: str) -> Any:
    """JSON if it parses, else the text itself (so `--task "what is 2+2"` works)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@app.command("dev")
def dev(
    agent_ref: str = typer.Argument(..., help="module:function or module:Class of the agent."),
    task: str = typer.Option(..., "--task", "-t", help="The task: JSON, or plain text."),
    server: str = typer.Option(DEFAULT_SERVER, "--server", envvar="KILN_SERVER_URL", help="kiln server URL."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="KILN_API_KEY"),
    timeout_s: float | None = typer.Option(None, "--timeout-s", min=0.001, help="Attempt time limit."),
) -> None:
    """Run one task through the agent now and print its trace (spans, LLM calls, rewards) and reward."""
    importable_cwd()
    attempt, spans = asyncio.run(dev_once(agent_ref, parse_task(task), server, api_key=api_key, timeout_s=timeout_s))
    print_report(Console(), attempt, spans)
    if attempt.status.value != "succeeded":
        raise typer.Exit(1)
