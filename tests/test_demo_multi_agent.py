"""The multi-agent demo (planner -> calculator -> answerer) and per-agent rewards in GRPO.

Each agent's share of the outcome is a reward named after it; `GRPO(agent_rewards=...)` makes each
agent's LoRA learn from its own share instead of the team's score.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentkiln.algorithms.grpo import GRPO
from agentkiln.demo.multi_agent import (
    ANSWERER,
    PLANNER,
    expression_of,
    number_only,
    planner_answerer_agent,
    score,
)
from agentkiln.engine.base import ChatRequest
from agentkiln.models import Attempt, AttemptStatus, Rollout, Span
from agentkiln.protocol import SpanAttrs, SpanNames
from agentkiln.training.policies import plan_policies
from agentkiln.training.trace import Trace, mean_reward, named_rewards
from tests.gateway_fakes import ScriptedEngine
from tests.test_frameworks_common import serving, system_text

TASK = {"question": "What is 17 * 23?", "answer": 391}


@pytest.fixture
def kiln_server():
    yield from serving()


def team_policy(expression: str, answer: str | None = None):
    """The planner writes `expression`; the answerer says `answer`, or copies the calculator's result."""

    def policy(req: ChatRequest) -> str:
        if "expression" in system_text(req):
            return expression
        if answer is not None:
            return answer
        return str(req.messages[-1]["content"]).rsplit("Calculator result: ", 1)[1]

    return policy


def named(run) -> dict[str, float]:
    return {
        s.attributes[SpanAttrs.reward_name]: s.attributes[SpanAttrs.reward_value]
        for s in run.spans
        if s.name == SpanNames.reward
    }


async def test_team_records_each_agent_and_its_share(kiln_server):
    engine = ScriptedEngine(team_policy("17 + 23"))  # the planner is wrong, the answerer faithful
    run = await kiln_server(engine).run(planner_answerer_agent, TASK)
    assert run.attempt.status.value == "succeeded", run.attempt.error
    assert run.agents() == [PLANNER, ANSWERER]
    assert named(run) == {PLANNER: 0.0, ANSWERER: 1.0, "primary": 0.0}
    assert "Calculator result: 40" in str(engine.requests[-1].messages[-1]["content"])
    trace = Trace(run.rollout, run.attempts, run.spans)
    assert trace.reward == 0.0  # the rollout's reward is the team's: the last final reward, the return value
    assert named_rewards([trace]) == {ANSWERER: 1.0, PLANNER: 0.0}


async def test_right_plan_wordy_answer(kiln_server):
    run = await kiln_server(ScriptedEngine(team_policy("17 * 23", "The answer is 391."))).run(
        planner_answerer_agent, TASK
    )
    assert named(run) == {PLANNER: 1.0, ANSWERER: 0.0, "primary": 0.0}


def test_scoring_rules():
    assert expression_of("12 * 9 = 108\nmore") == "12 * 9" and expression_of("") == ""
    assert number_only(" 108.") == 108.0 and number_only("-7") == -7.0
    assert number_only("The answer is 108") is None and number_only("108 pens") is None
    # The calculator failed: the answerer is scored on the right answer, the planner gets 0.
    failed = score(TASK, "seventeen", None, "391")
    assert (failed.planner, failed.answerer, failed.correct) == (0.0, 1.0, 1.0)
    unfaithful = score(TASK, "17 * 23", "391", "390")
    assert (unfaithful.planner, unfaithful.answerer, unfaithful.correct) == (1.0, 0.0, 0.0)


# --------------------------------------------------------------------------- per-agent rewards in GRPO


def _trace(rid: str, planner: float, answerer: float, team: float) -> Trace:
    def span(seq: int, name: str, attrs: dict) -> Span:
        return Span(rollout_id=rid, attempt_id=f"{rid}-a", name=name, sequence_id=seq, attributes=attrs)

    def call(seq: int, agent: str) -> Span:
        return span(
            seq,
            SpanNames.llm_call,
            {
                SpanAttrs.prompt_token_ids: [1, 2],
                SpanAttrs.response_token_ids: [3],
                SpanAttrs.response_logprobs: [-0.5],
                SpanAttrs.agent_name: agent,
                SpanAttrs.finish_reason: "stop",
            },
        )

    def reward(seq: int, name: str, value: float) -> Span:
        attrs = {SpanAttrs.reward_value: value, SpanAttrs.reward_name: name, SpanAttrs.reward_final: True}
        return span(seq, SpanNames.reward, attrs)

    spans = [
        call(1, PLANNER),
        call(2, ANSWERER),
        reward(3, PLANNER, planner),
        reward(4, ANSWERER, answerer),
        reward(5, "primary", team),
    ]
    rollout = Rollout(rollout_id=rid, input=TASK, metadata={"group_id": "g"})
    attempt = Attempt(attempt_id=f"{rid}-a", rollout_id=rid, sequence_id=1, status=AttemptStatus.succeeded)
    return Trace(rollout, [attempt], spans)


class RecordingLearner:
    """Stands in for the learner (no weights needed): keeps the transitions of each update."""

    def __init__(self) -> None:
        self.seen = []

    def update(self, transitions):
        self.seen.extend(transitions)
        return {"transitions": float(len(transitions))}


def _advantages(algorithm: GRPO, traces, tmp_path: Path) -> dict[str, dict[str, float]]:
    import asyncio

    policies = plan_policies(tmp_path, algorithm.agents, None)
    for policy in policies:
        policy.learner = RecordingLearner()
    asyncio.run(algorithm._learn_step(policies, traces))
    return {p.agent: {t.rollout_id: t.advantage for t in p.learner.seen} for p in policies}


def test_each_agent_learns_from_its_own_share(tmp_path):
    # One group, the same team score; the planner did well in r1, the answerer in r2.
    traces = [_trace("r1", 1.0, 0.0, 0.0), _trace("r2", 0.0, 1.0, 0.0)]
    assert mean_reward(traces) == 0.0 and named_rewards(traces) == {ANSWERER: 0.5, PLANNER: 0.5}

    own = _advantages(GRPO(agents=[PLANNER, ANSWERER], agent_rewards=[PLANNER, ANSWERER]), traces, tmp_path)
    assert own[PLANNER]["r1"] > 0 > own[PLANNER]["r2"]
    assert own[ANSWERER]["r2"] > 0 > own[ANSWERER]["r1"]

    # Without agent_rewards both learn from the team's score: no signal in this group.
    shared = _advantages(GRPO(agents=[PLANNER, ANSWERER]), traces, tmp_path)
    assert all(a == 0.0 for agent in shared.values() for a in agent.values())

    # Only the planner on its own share; the answerer keeps the team's.
    mixed = _advantages(GRPO(agents=[PLANNER, ANSWERER], agent_rewards={PLANNER: PLANNER}), traces, tmp_path)
    assert mixed[PLANNER]["r1"] > 0 and all(a == 0.0 for a in mixed[ANSWERER].values())


def test_agent_rewards_are_checked_at_construction():
    with pytest.raises(ValueError, match="needs agents"):
        GRPO(agent_rewards=[PLANNER])
    with pytest.raises(ValueError, match="not trained"):
        GRPO(agents=[PLANNER], agent_rewards={ANSWERER: "x"})
    with pytest.raises(TypeError):
        GRPO(agents=[PLANNER], agent_rewards=PLANNER)


# --------------------------------------------------------------------------- the CLI


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kiln_demo_multi_agent_smoke(tmp_path: Path) -> None:
    run_dir = tmp_path / "multi"
    cmd = [sys.executable, "-m", "agentkiln.cli.main", "demo", "--multi-agent", "--engine", "tiny",
           "--steps", "2", "--tasks-per-step", "1", "--samples", "2", "--train-size", "4", "--val-size", "2",
           "--n-runners", "2", "--eval-every", "1", "--report-to", "none", "--run-dir", str(run_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=580, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert set(result["shares"]) == {PLANNER, ANSWERER, "accuracy"}
    for key in result["shares"]:
        assert result["shares"][key]["before"] is not None and result["shares"][key]["after"] is not None
    assert set(result["extra"]["val_rewards"]) == {"before", "step-1", "step-2"}
    assert [h["step"] for h in result["history"]] == [1, 2]
    for record in result["history"]:
        assert set(record["train_rewards"]) == {PLANNER, ANSWERER}
        assert set(record["val_rewards"]) == {PLANNER, ANSWERER}
        assert {a: m["transitions"] for a, m in record["agents"].items()} == {PLANNER: 2.0, ANSWERER: 2.0}
    for agent in (PLANNER, ANSWERER):
        assert (run_dir / "agents" / agent / "adapters" / "step-2" / "adapter_config.json").exists()
    assert "planner: expression right" in out.stdout and "answerer: reports its number" in out.stdout
