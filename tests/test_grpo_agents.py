"""Per-agent GRPO on the tiny model: one LoRA per agent, each trained on its own calls and served to them."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

import agentkiln as kiln
from agentkiln.algorithms.grpo import GRPO, GRPOConfig, LoraSettings
from agentkiln.engine.model_files import tiny_model_dir
from agentkiln.models import RolloutMode
from agentkiln.protocol import SpanAttrs, SpanNames
from agentkiln.store import open_store
from agentkiln.trainer import Trainer

SAMPLES = 3


@kiln.rollout
def team(task, llm, rollout):
    """Writer once, critic twice, helper once (the helper is not trained).

    Training reward is random (every group has signal); validation scores 1 when the writer was
    served its own adapter (the engine's version is the response's system_fingerprint), so the
    best-checkpoint logic has a deterministic winner.
    """
    kw = llm.chat_kwargs(max_tokens=4)
    msgs = [{"role": "user", "content": f"Write about {task['topic']}."}]
    draft = llm.for_agent("writer").openai().chat.completions.create(messages=msgs, **kw)
    critic = llm.for_agent("critic").openai()
    for _ in range(2):
        critic.chat.completions.create(messages=msgs, **kw)
    llm.for_agent("helper").openai().chat.completions.create(messages=msgs, **kw)
    if rollout.mode == RolloutMode.val:
        return 1.0 if (draft.system_fingerprint or "").startswith("writer@") else 0.0
    return random.random()


def _grpo(steps: int, **kw) -> GRPO:
    return GRPO(
        model_dir=str(tiny_model_dir()),
        agents=["writer", "critic"],
        steps=steps,
        tasks_per_step=1,
        samples_per_task=SAMPLES,
        eval_every=1,
        config=GRPOConfig(lr=1e-3, lora=LoraSettings(r=4, alpha=8), bf16=False),
        **kw,
    )


async def _stored(db):
    store = open_store(str(db))
    try:
        resources = await store.query_resources()
        rollouts = await store.query_rollouts(mode="train", limit=1000)
        spans = {r.rollout_id: await store.query_spans(r.rollout_id, name=SpanNames.llm_call) for r in rollouts}
        return resources, rollouts, spans
    finally:
        await store.close()


@pytest.mark.timeout(240)
def test_each_agent_learns_its_own_adapter_and_is_served_it(tmp_path):
    run = tmp_path / "run"
    db = tmp_path / "kiln.db"
    trainer = Trainer(_grpo(2), n_runners=SAMPLES, engine="tiny", store=f"sqlite:///{db}", run_dir=run)
    result = trainer.fit(team, [{"topic": "tea"}, {"topic": "rain"}], [{"topic": "val"}])

    # Each learner saw only its agent's calls: 1 writer call and 2 critic calls per rollout.
    assert [h["step"] for h in result.history] == [1, 2]
    for h in result.history:
        assert h["agents"]["writer"]["transitions"] == SAMPLES
        assert h["agents"]["critic"]["transitions"] == 2 * SAMPLES
        assert set(h["agents"]) == {"writer", "critic"}
    for agent in ("writer", "critic"):
        assert (run / "agents" / agent / "checkpoint" / "trainer_state.pt").exists()
        assert (run / "agents" / agent / "adapters" / "step-2" / "adapter_config.json").exists()

    # Validation: base 0, then 1 once the writer was served its adapter; step 1 is kept as the best.
    assert result.val_before == 0.0 and result.best_val == 1.0 and result.val_after == 1.0
    assert result.extra["agent_adapters"] == {a: str(run / "best" / a) for a in ("writer", "critic")}
    writer_best = (run / "best" / "writer" / "adapter_model.safetensors").read_bytes()
    assert writer_best != (run / "best" / "critic" / "adapter_model.safetensors").read_bytes()

    resources, rollouts, spans = asyncio.run(_stored(db))
    step1 = resources[1]  # v1: base for everyone; v2: step 1's adapters
    assert step1.llms["main"].adapter_path is None
    assert {a: e.adapter_path for a, e in step1.agent_llms().items()} == {
        a: str(run / "agents" / a / "adapters" / "step-1") for a in ("writer", "critic")
    }
    final = resources[-1]
    assert {a: e.adapter_path for a, e in final.agent_llms().items()} == result.extra["agent_adapters"]

    # The engine served each trained agent its own adapter; the helper kept the base weights.
    step2 = [r for r in rollouts if r.metadata["group_id"].startswith("s2-")]
    assert len(step2) == SAMPLES
    for r in step2:
        versions = [
            (s.attributes[SpanAttrs.agent_name], s.attributes[SpanAttrs.model_version]) for s in spans[r.rollout_id]
        ]
        assert versions == [
            ("writer", "writer@v2"),
            ("critic", "critic@v2"),
            ("critic", "critic@v2"),
            ("helper", "base"),
        ]

    # A second run on the same folder resumes every agent's learner at its own checkpoint.
    again = Trainer(_grpo(3), n_runners=SAMPLES, engine="tiny", run_dir=run).fit(team, [{"topic": "tea"}])
    assert [h["step"] for h in again.history] == [1, 2, 3]
    for agent in ("writer", "critic"):
        state = torch.load(run / "agents" / agent / "checkpoint" / "trainer_state.pt", weights_only=True)
        assert state["step"] == 3  # one optimizer step per GRPO step, across both runs
        assert (run / "agents" / agent / "adapters" / "step-3" / "adapter_config.json").exists()
