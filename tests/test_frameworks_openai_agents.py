"""examples/openai_agents_sdk.py: Agent + function_tool under Runner.run, Responses API and chat completions."""

from __future__ import annotations

import pytest

from agentkiln.models import FailureKind
from agentkiln.protocol import SpanAttrs
from examples import openai_agents_sdk
from tests.gateway_fakes import ScriptedEngine
from tests.test_frameworks_common import assert_continues, assert_recorded, serving, solver_policy


@pytest.fixture
def kiln_server():
    yield from serving()


@pytest.mark.parametrize(
    ("agent", "api"),
    [(openai_agents_sdk.agent, "responses"), (openai_agents_sdk.agent_chat_completions, "chat.completions")],
)
async def test_agents_sdk_run_is_recorded(kiln_server, agent, api):
    run = await kiln_server(ScriptedEngine(solver_policy())).run(agent)
    assert_recorded(run, n_calls=2, agent="solver", reward=1.0)
    assert [s.attributes["kiln.llm.api"] for s in run.calls] == [api, api]
    assert_continues(*run.calls)
    assert run.calls[0].attributes[SpanAttrs.request]["messages"][0]["role"] in ("system", "developer")


async def test_failing_tool_is_attributed_to_the_tool(kiln_server):
    """The SDK reports the tool's error to the model and carries on; the tool span keeps the blame."""
    engine = ScriptedEngine(solver_policy("17 / 0"))
    run = await kiln_server(engine).run(openai_agents_sdk.agent)
    assert run.attempt.status.value == "succeeded"
    (tool,) = run.tool_spans
    assert tool.attributes[SpanAttrs.failure_kind] == FailureKind.tool_error.value
    assert tool.status.code == "ERROR"
    assert run.rewards == [0.0]  # "The answer is <error text>" does not contain 391
