"""The whole loop on the tiny model: server + engine + runners + GRPO + weight swap, over real HTTP."""

import json

import pytest

from agentkiln.adapter.credit import CreditConfig
from agentkiln.algorithms.grpo import GRPO, GRPOConfig, LoraSettings
from agentkiln.demo.agent import calculator_agent
from agentkiln.demo.tasks import make_tasks
from agentkiln.engine.model_files import tiny_model_dir
from agentkiln.protocol import SpanNames
from agentkiln.store import open_store
from agentkiln.trainer import Trainer


@pytest.fixture(scope="module")
def tiny_dir():
    return str(tiny_model_dir())


def test_trainer_runs_grpo_loop_and_swaps_weights(tmp_path, tiny_dir):
    db = tmp_path / "kiln.db"
    algorithm = GRPO(
        model_dir=tiny_dir,
        steps=2,
        tasks_per_step=2,
        samples_per_task=2,
        eval_every=1,
        config=GRPOConfig(lr=1e-3, lora=LoraSettings(r=4, alpha=8), bf16=False),
        credit=CreditConfig(scale_by_std=False),
    )
    events = []
    trainer = Trainer(
        algorithm,
        n_runners=4,
        store=f"sqlite:///{db}",
        engine="tiny",
        run_dir=tmp_path / "run",
        on_event=lambda kind, data: events.append((kind, data)),
    )
    result = trainer.fit(calculator_agent, make_tasks(6, seed=1), make_tasks(2, seed=2))

    assert [h["step"] for h in result.history] == [1, 2]
    assert result.val_before is not None and result.val_after is not None
    assert all("val_reward" in h for h in result.history)
    assert [k for k, _ in events].count("validation") == 3  # before + every step
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2
    assert (tmp_path / "run" / "checkpoint" / "trainer_state.pt").exists()
    assert (tmp_path / "run" / "adapters" / "step-2" / "adapter_config.json").exists()

    # Everything went through the durable store: reopen it and look.
    import asyncio

    async def inspect():
        store = open_store(str(db))
        try:
            resources = await store.query_resources()
            train = await store.query_rollouts(mode="train", limit=1000)
            spans = await store.query_spans(train[0].rollout_id)
            return resources, train, spans
        finally:
            await store.close()

    resources, train, spans = asyncio.run(inspect())
    # v1 base, one per step, and the final "best" publication.
    assert len(resources) >= 4
    assert resources[1].llms["main"].adapter_path.endswith("step-1")
    assert len(train) == 2 * 2 * 2
    assert all(r.status.value == "succeeded" for r in train)
    calls = [s for s in spans if s.name == SpanNames.llm_call]
    assert calls and calls[0].attributes["kiln.llm.prompt_token_ids"]
    assert any(s.name == SpanNames.reward for s in spans)
    # Later rollouts were served by the swapped-in weights.
    later = asyncio.run(_spans_of_step(db, "s2"))
    versions = {s.attributes.get("kiln.model.version") for s in later if s.name == SpanNames.llm_call}
    assert versions == {"v2"}


async def _spans_of_step(db, prefix):
    store = open_store(str(db))
    try:
        rollouts = await store.query_rollouts(mode="train", limit=1000)
        out = []
        for r in rollouts:
            if r.metadata.get("group_id", "").startswith(prefix + "-"):
                out += await store.query_spans(r.rollout_id)
        return out
    finally:
        await store.close()


def test_grpo_resumes_from_checkpoint_after_a_crash(tmp_path, tiny_dir):
    """A second run on the same run_dir continues at the saved step instead of starting over."""

    def algorithm(steps):
        return GRPO(
            model_dir=tiny_dir,
            steps=steps,
            tasks_per_step=1,
            samples_per_task=2,
            config=GRPOConfig(lr=1e-3, lora=LoraSettings(r=4, alpha=8), bf16=False),
        )

    tasks = make_tasks(4, seed=3)
    first = Trainer(algorithm(1), n_runners=2, engine="tiny", run_dir=tmp_path / "run").fit(calculator_agent, tasks)
    assert [h["step"] for h in first.history] == [1]
    second = Trainer(algorithm(2), n_runners=2, engine="tiny", run_dir=tmp_path / "run").fit(calculator_agent, tasks)
    # Only step 2 ran again; the history file carries step 1 from the first run.
    assert [h["step"] for h in second.history] == [1, 2]
    assert (tmp_path / "run" / "adapters" / "step-2" / "adapter_config.json").exists()
