"""examples/langgraph_react.py: the prebuilt ReAct agent and the write -> check -> rewrite loop graph."""

from __future__ import annotations

import pytest

from agentkiln.engine.base import ChatRequest
from agentkiln.models import FailureKind
from agentkiln.protocol import SpanAttrs
from examples import langgraph_react
from tests.gateway_fakes import ScriptedEngine
from tests.test_frameworks_common import (
    assert_continues,
    assert_recorded,
    serving,
    solver_policy,
    system_text,
)


@pytest.fixture
def kiln_server():
    yield from serving()


async def test_react_agent_is_recorded(kiln_server):
    run = await kiln_server(ScriptedEngine(solver_policy())).run(langgraph_react.agent)
    assert_recorded(run, n_calls=2, agent="solver", reward=1.0)
    assert_continues(*run.calls)


async def test_react_agent_tool_failure_is_tool_error(kiln_server):
    run = await kiln_server(ScriptedEngine(solver_policy("2 ** 'x'"))).run(langgraph_react.agent)
    (tool,) = run.tool_spans
    assert tool.attributes[SpanAttrs.failure_kind] == FailureKind.tool_error.value
    # ToolNode re-raises tool exceptions by default: the attempt fails and says why.
    assert run.attempt.status.value == "failed" and run.attempt.error.kind == FailureKind.tool_error


def write_check_policy(req: ChatRequest) -> str:
    """Writer drafts wrong, checker objects once, the rewrite is right and approved."""
    if "You check answers" in system_text(req):
        return "OK" if "391" in req.messages[-1]["content"] else "REVISE: 17 * 23 is not 400"
    drafts = sum(1 for m in req.messages if m.get("role") == "assistant")
    return "It is 400." if drafts == 0 else "It is 391."


async def test_write_check_rewrite_loop_keeps_the_writers_history(kiln_server):
    run = await kiln_server(ScriptedEngine(write_check_policy)).run(langgraph_react.write_check)
    assert_recorded(run, n_calls=4, agent=None, reward=1.0)
    assert run.agents() == ["writer", "checker", "writer", "checker"]
    first_draft, _, rewrite, _ = run.calls
    assert_continues(first_draft, rewrite)  # the rewrite's prompt holds the first draft
    assert "REVISE" in str(rewrite.attributes[SpanAttrs.request]["messages"][-1]["content"])
