"""examples/autogen_team.py: AssistantAgent with a tool, and a solver + reviewer RoundRobinGroupChat."""

from __future__ import annotations

import pytest

from agentkiln.adapter.transitions import build_transitions
from agentkiln.engine.base import ChatRequest
from agentkiln.models import FailureKind
from agentkiln.protocol import SpanAttrs
from examples import autogen_team
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


async def test_assistant_with_tool_is_recorded(kiln_server):
    run = await kiln_server(ScriptedEngine(solver_policy())).run(autogen_team.agent)
    assert_recorded(run, n_calls=2, agent="solver", reward=1.0)
    assert run.calls[0].attributes[SpanAttrs.finish_reason] == "tool_calls"
    assert_continues(*run.calls)


def team_policy(req: ChatRequest) -> str:
    if "You review" in system_text(req):
        return "APPROVED"
    return solver_policy()(req)


async def test_round_robin_team_names_each_agent(kiln_server):
    run = await kiln_server(ScriptedEngine(team_policy)).run(autogen_team.team)
    assert_recorded(run, n_calls=3, agent=None, reward=1.0)
    assert run.agents() == ["solver", "solver", "reviewer"]
    solver_answer, review = run.calls[1], run.calls[2]
    assert_continues(solver_answer, review)  # the reviewer sees the solver's answer


async def test_tool_failure_is_reported_to_the_model_and_recorded(kiln_server):
    run = await kiln_server(ScriptedEngine(solver_policy("1 / 0"))).run(autogen_team.agent)
    assert run.attempt.status.value == "succeeded"  # AutoGen hands the error to the model
    (tool,) = run.tool_spans
    assert tool.attributes[SpanAttrs.failure_kind] == FailureKind.tool_error.value
    assert "ZeroDivisionError" in tool.attributes[SpanAttrs.exception_message]


# --------------------------------------------------------------------------- one client for the team


async def test_shared_client_team_sends_no_speaker_name(kiln_server):
    """AutoGen names the senders of user messages, never the speaker: with no map no call is named
    (the reviewer's call carries "user" and "solver" names, neither of them its own)."""
    run = await kiln_server(ScriptedEngine(team_policy)).run(autogen_team.shared_team)
    assert_recorded(run, n_calls=3, agent=None, reward=1.0)
    assert run.agents() == [None, None, None]
    review = run.calls[2].attributes[SpanAttrs.request]["messages"]
    assert review[0]["role"] == "system" and "name" not in review[0]
    assert [m.get("name") for m in review if m["role"] == "user"] == ["user", "solver"]


async def test_shared_client_team_is_named_by_the_agent_name_map(kiln_server):
    engine = ScriptedEngine(team_policy)
    run = await kiln_server(engine, agent_names=autogen_team.AGENT_NAMES).run(autogen_team.shared_team)
    assert_recorded(run, n_calls=3, agent=None, reward=1.0)
    assert run.agents() == ["solver", "solver", "reviewer"]
    assert [r.agent for r in engine.requests] == ["solver", "solver", "reviewer"]  # picks per-agent weights
    # What training reads: agent_match (and each GRPO(agents=[...]) learner's pattern) selects by it.
    reviewer = build_transitions(run.rollout, run.attempts, run.spans, agent_match="^reviewer$")
    assert [t.agent for t in reviewer.transitions] == ["reviewer"]
    solver = build_transitions(run.rollout, run.attempts, run.spans, agent_match="^solver$")
    assert len(solver.transitions) == 2 and {t.agent for t in solver.transitions} == {"solver"}
