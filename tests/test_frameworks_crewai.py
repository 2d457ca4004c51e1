"""examples/crewai_agent.py: a CrewAI crew (solver with a tool, then a reviewer) through the gateway.

CrewAI pins openai<3, so it lives in its own environment, `.venv-crewai` (scripts/setup_crewai.sh;
scripts/test.sh builds it). The server and the scripted engine run here, in the test process; the
crew runs in a `kiln run` process of `.venv-crewai`, exactly as a user would start it, and the
checks read what the store holds, as for the other framework examples.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from agentkiln.engine.base import ChatRequest
from agentkiln.models import FailureKind
from agentkiln.protocol import SpanAttrs
from tests.gateway_fakes import ScriptedEngine
from tests.test_frameworks_common import (
    TASK,
    KilnServer,
    Run,
    assert_continues,
    assert_recorded,
    run_in_venv,
    serving,
    solver_policy,
    system_text,
)

ROOT = Path(__file__).resolve().parent.parent
KILN = ROOT / ".venv-crewai" / "bin" / "kiln"

pytestmark = pytest.mark.skipif(
    not KILN.exists(),
    reason="CrewAI needs its own environment (openai<3): run `bash scripts/setup_crewai.sh` to create .venv-crewai",
)


@pytest.fixture
def kiln_server():
    yield from serving()


def crew_env(home: Path) -> dict[str, str]:
    """The environment of the crew's process: no trace of this venv, CrewAI's phoning home off.

    Not OTEL_SDK_DISABLED: it turns the OpenTelemetry SDK off process-wide, AgentKiln's
    `kiln run --otel` export included; CREWAI_DISABLE_TELEMETRY is enough for CrewAI.
    HOME/XDG_*: CrewAI writes ~/.config/crewai and ~/.local/share/<cwd name>/*.db.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{KILN.parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        CREWAI_DISABLE_TELEMETRY="true",
        CREWAI_TRACING_ENABLED="false",
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_DATA_HOME=str(home / ".local" / "share"),
    )
    return env


async def run_crew(server: KilnServer, home: Path, task: Any = TASK, *, sampling: dict[str, Any] | None = None) -> Run:
    """Enqueue `task`, run `kiln run examples.crewai_agent:agent` in .venv-crewai until the queue is empty."""
    return await run_in_venv(server, KILN, "examples.crewai_agent:agent", crew_env(home), task, sampling)


def crew_policy(expression: str = "17 * 23") -> Any:
    """CrewAI's system prompts start 'You are <role>.': the solver calls the tool, the reviewer restates."""
    solver = solver_policy(expression)

    def policy(req: ChatRequest) -> str:
        if system_text(req).startswith("You are Reviewer"):
            said = re.search(r"The answer is (.+?)\.?$", str(req.messages[-1]["content"]), re.MULTILINE)
            return f"The final result is {said.group(1) if said else 'unknown'}."
        return solver(req)

    return policy


async def test_crew_calls_are_recorded_per_agent(kiln_server, tmp_path):
    engine = ScriptedEngine(crew_policy())
    run = await run_crew(kiln_server(engine), tmp_path)
    assert_recorded(run, n_calls=3, agent=None, reward=1.0)
    assert run.agents() == ["solver", "solver", "reviewer"]
    call_tool, answer, review = run.calls
    assert call_tool.attributes[SpanAttrs.finish_reason] == "tool_calls"
    assert_continues(call_tool, answer)  # the tool call and its result go back to the solver
    assert_continues(answer, review)  # the reviewer's task context holds the solver's answer
    assert engine.requests[0].tools and not engine.requests[2].tools  # only the solver has the tool
    (tool,) = run.tool_spans
    assert tool.attributes.get(SpanAttrs.failure_kind) is None


async def test_crew_tool_failure_is_recorded_and_scored(kiln_server, tmp_path):
    run = await run_crew(kiln_server(ScriptedEngine(crew_policy("1 / 0"))), tmp_path)
    # CrewAI hands the tool's error to the model as the tool result; the crew goes on.
    assert_recorded(run, n_calls=3, agent=None, reward=0.0)
    (tool,) = run.tool_spans
    assert tool.attributes[SpanAttrs.failure_kind] == FailureKind.tool_error.value
    assert "ZeroDivisionError" in tool.attributes[SpanAttrs.exception_message]
    assert "ZeroDivisionError" in str(run.calls[1].attributes[SpanAttrs.request]["messages"][-1]["content"])


async def test_crew_uses_the_published_sampling(kiln_server, tmp_path):
    engine = ScriptedEngine(crew_policy())
    run = await run_crew(kiln_server(engine), tmp_path, sampling={"temperature": 0.25, "max_tokens": 200})
    assert_recorded(run, n_calls=3, agent=None, reward=1.0)
    assert [(r.temperature, r.max_tokens) for r in engine.requests] == [(0.25, 200)] * 3
