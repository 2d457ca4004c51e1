"""Each call's own sampling settings: recorded on its span, carried on its transition, used by the learner.

The headline check: an unmodified openai-SDK agent samples with its own temperature 0.5 and
top_p 0.9 through the gateway (tiny engine); on the first GRPO step (learner on the same tiny
weights, config temperature left at 1.0) every trained token's ratio is 1 within 1e-3.
"""

from __future__ import annotations

import asyncio

import openai
import pytest

from agentkiln.adapter.transitions import SkipReason, build_batch, build_transitions
from agentkiln.algorithms.grpo import GRPOConfig
from agentkiln.engine.model_files import tiny_model_dir
from agentkiln.models import AttemptStatus, SpanIn
from agentkiln.protocol import LLMCall, SpanAttrs, SpanNames
from agentkiln.store.client import HttpStore
from agentkiln.training.learner import Learner
from tests.tiny_server import tiny_server

TOLERANCE = 1e-3


def _agent_calls(base_url: str, question: str) -> None:
    """The agent: plain openai SDK, its own sampling settings, nothing of AgentKiln."""
    client = openai.OpenAI(base_url=base_url, api_key="k", max_retries=0)
    messages = [{"role": "user", "content": question}]
    reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0.5, top_p=0.9, max_tokens=12)
    messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
    client.responses.create(model="tiny", input=question + " again", temperature=0.5, top_p=0.9, max_output_tokens=12)


async def _collect(url: str, rollouts: list[tuple[str, str]], rewards: list[float]):
    async with HttpStore(url) as store:
        items = []
        for (rid, aid), reward in zip(rollouts, rewards):
            span = SpanIn(
                rollout_id=rid,
                attempt_id=aid,
                name=SpanNames.reward,
                attributes={SpanAttrs.reward_value: reward, SpanAttrs.reward_final: True},
            )
            await store.add_spans([span])
            await store.update_attempt(rid, aid, status=AttemptStatus.succeeded)
            items.append((await store.get_rollout(rid), await store.query_attempts(rid), await store.query_spans(rid)))
        return items


@pytest.fixture(scope="module")
def recorded():
    import httpx

    with tiny_server() as srv:
        rollouts = []
        for i in range(4):
            ar = httpx.post(f"{srv.url}/api/v1/rollouts/start", json={"input": {"q": "group"}}, timeout=30).json()
            rid, aid = ar["rollout"]["rollout_id"], ar["attempt"]["attempt_id"]
            _agent_calls(f"{srv.url}/rollout/{rid}/attempt/{aid}/v1", f"What is {i} + {i}?")
            rollouts.append((rid, aid))
        yield asyncio.run(_collect(srv.url, rollouts, [0.0, 1.0, 0.0, 1.0]))


def test_settings_are_on_the_span_and_the_transition(recorded):
    rollout, attempts, spans = recorded[0]
    calls = [LLMCall.from_span(s) for s in spans if s.name == SpanNames.llm_call]
    assert len(calls) == 2
    for call, span in zip(calls, [s for s in spans if s.name == SpanNames.llm_call]):
        assert (call.temperature, call.top_p) == (0.5, 0.9)
        assert span.attributes[SpanAttrs.temperature] == 0.5 and span.attributes[SpanAttrs.top_p] == 0.9
        assert SpanAttrs.top_k not in span.attributes  # the engine applied none
    result = build_transitions(rollout, attempts, spans)
    assert [(t.temperature, t.top_p) for t in result.transitions] == [(0.5, 0.9), (0.5, 0.9)]


def test_first_grpo_step_ratio_is_one_under_the_agents_own_settings(recorded):
    transitions, report = build_batch(recorded)
    assert not report and len(transitions) == 8
    assert any(t.advantage != 0 for t in transitions)
    learner = Learner(tiny_model_dir(), GRPOConfig(bf16=False, epochs=1, lr=1e-3))  # config temperature 1.0
    lps = learner.logprobs(transitions)
    worst = max(abs(a - b) for t, lp in zip(transitions, lps) for a, b in zip(lp, t.logprobs))
    assert worst < TOLERANCE, f"log-prob differs from the recorded one by {worst}"
    metrics = learner.update(transitions)
    assert metrics["trained_tokens"] > 0
    assert metrics["ratio_dev_max"] < TOLERANCE, metrics
    assert abs(metrics["ratio_mean"] - 1.0) < TOLERANCE and metrics["clip_frac"] == 0.0


def test_without_recorded_settings_the_config_temperature_applies(recorded):
    transitions, _ = build_batch(recorded)
    bare = [t.model_copy(update={"temperature": None, "top_p": None}) for t in transitions]
    lps = Learner(tiny_model_dir(), GRPOConfig(bf16=False, temperature=0.5)).logprobs(bare)
    assert max(abs(a - b) for t, lp in zip(bare, lps) for a, b in zip(lp, t.logprobs)) < TOLERANCE
    lps = Learner(tiny_model_dir(), GRPOConfig(bf16=False)).logprobs(bare)  # 1.0: not what was sampled
    assert max(abs(a - b) for t, lp in zip(bare, lps) for a, b in zip(lp, t.logprobs)) > 0.01


def test_settings_the_learner_cannot_reproduce_drop_the_call_with_a_reason(recorded):
    rollout, attempts, spans = recorded[0]
    changed = []
    for s in spans:
        if s.name == SpanNames.llm_call:
            s = s.model_copy(update={"attributes": {**s.attributes, SpanAttrs.top_k: 40}})
        changed.append(s)
    result = build_transitions(rollout, attempts, changed)
    assert not result.transitions
    assert {(r.reason, r.detail) for r in result.report} == {(SkipReason.unreproducible_sampling, "top_k=40")}
