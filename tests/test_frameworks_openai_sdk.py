"""examples/openai_sdk_agent.py (plain openai SDK tool loop) through a real runner, server and gateway."""

from __future__ import annotations

import pytest

from agentkiln.models import FailureKind
from agentkiln.protocol import SpanAttrs
from examples import openai_sdk_agent
from tests.gateway_fakes import ScriptedEngine
from tests.test_frameworks_common import assert_continues, assert_recorded, serving, solver_policy


@pytest.fixture
def kiln_server():
    yield from serving()


async def test_tool_loop_is_recorded_per_call_with_agent_name(kiln_server):
    run = await kiln_server(ScriptedEngine(solver_policy())).run(openai_sdk_agent.agent)
    assert_recorded(run, n_calls=2, agent="solver", reward=1.0)
    first, second = run.calls
    assert first.attributes[SpanAttrs.finish_reason] == "tool_calls"
    assert_continues(first, second)
    (tool,) = run.tool_spans
    assert tool.attributes["kiln.tool.name"] == "calculate" and tool.status.code != "ERROR"


async def test_failing_tool_fails_the_attempt_as_tool_error(kiln_server):
    run = await kiln_server(ScriptedEngine(solver_policy("17 / 0"))).run(openai_sdk_agent.agent)
    assert run.attempt.status.value == "failed"
    assert run.attempt.error.kind == FailureKind.tool_error
    assert "calculate" in run.attempt.error.message and "ZeroDivisionError" in run.attempt.error.message
    (tool,) = run.tool_spans
    assert tool.attributes[SpanAttrs.failure_kind] == FailureKind.tool_error.value
    assert run.agents() == ["solver"] and run.rewards == []
