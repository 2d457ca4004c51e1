"""One-step off-policy overlap in the GRPO loop: the next step samples while the learner updates.

Through the real Trainer on the tiny model (server, engine, runners, HTTP store).
"""

from __future__ import annotations

import asyncio
import math

import pytest

from agentkiln.adapter.credit import CreditConfig
from agentkiln.adapter.transitions import build_batch
from agentkiln.algorithms.grpo import GRPO, GRPOConfig, LoraSettings
from agentkiln.demo.agent import calculator_agent
from agentkiln.demo.tasks import make_tasks
from agentkiln.engine.model_files import tiny_model_dir
from agentkiln.protocol import SpanAttrs, SpanNames
from agentkiln.store import open_store
from agentkiln.trainer import Trainer
from agentkiln.training.learner import Learner


class RecordingGRPO(GRPO):
    """GRPO that keeps each step's transitions, learner metrics and learning time window."""

    slow_learning_s = 0.0  # a longer update, so the overlap is visible in the timestamps

    def __post_init__(self) -> None:
        super().__post_init__()
        self.seen: list[tuple[list, dict]] = []
        self.learning: list[tuple[float, float]] = []

    async def _learn(self, policy, traces):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        transitions, _ = build_batch(traces, agent_match=policy.match, credit=self.credit, merge=self.merge_turns)
        metrics = await super()._learn(policy, traces)
        await asyncio.sleep(self.slow_learning_s)
        self.seen.append((transitions, metrics))
        self.learning.append((t0, loop.time()))
        return metrics


def _algorithm(lr: float, overlap: bool) -> RecordingGRPO:
    return RecordingGRPO(
        model_dir=str(tiny_model_dir()),
        steps=4,
        tasks_per_step=1,
        samples_per_task=3,
        eval_every=2,
        temperature=1.0,
        overlap=overlap,
        config=GRPOConfig(lr=lr, lora=LoraSettings(r=4, alpha=8), bf16=False, skip_zero_advantage=False),
        credit=CreditConfig(scale_by_std=False),
    )


async def _step_versions(db: str) -> dict[int, set[str]]:
    """The engine versions that served each training step's LLM calls."""
    store = open_store(db)
    try:
        out: dict[int, set[str]] = {}
        for r in await store.query_rollouts(mode="train", limit=1000):
            step = int(r.metadata["group_id"].split("-")[0][1:])
            for s in await store.query_spans(r.rollout_id, name=SpanNames.llm_call):
                out.setdefault(step, set()).add(s.attributes[SpanAttrs.model_version])
        return out
    finally:
        await store.close()


def test_unchanged_policy_gives_the_on_policy_loss(tmp_path) -> None:
    """lr=0: the stale sampler is the learner's own policy, so every overlapped step's loss is the
    loss an on-policy learner computes on the same transitions, and the importance ratio is 1."""
    algo = _algorithm(lr=0.0, overlap=True)
    result = Trainer(algo, n_runners=3, engine="tiny", run_dir=tmp_path / "run").fit(
        calculator_agent, make_tasks(6, seed=1), make_tasks(2, seed=2)
    )
    assert [h["step"] for h in result.history] == [1, 2, 3, 4]
    # Steps 2 and 4 validate, so steps 2 and 4 sample fresh; steps 1 -> 2 and 3 -> 4 overlap... and
    # step 1 (first) and 3 (after a validation) sample under the newest weights.
    assert [h["behind"] for h in result.history] == [0, 1, 0, 1]
    for h in result.history:  # sampling throughput, read by bench/bench_demo_engines.py
        assert h["sample_tokens"] > 0
        assert h["sample_tokens_per_s"] == pytest.approx(h["sample_tokens"] / h["sample_s"], rel=1e-2)
    fresh = Learner(str(tiny_model_dir()), algo.config)
    for transitions, metrics in algo.seen:
        assert transitions, "every step trains on something"
        on_policy = fresh.update(transitions)
        assert math.isclose(metrics["loss"], on_policy["loss"], rel_tol=1e-5, abs_tol=1e-7)
        assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-3)


def test_overlap_samples_while_learning_and_swaps_weights_between_phases(tmp_path) -> None:
    db = tmp_path / "kiln.db"
    algo = _algorithm(lr=1e-2, overlap=True)
    algo.slow_learning_s = 1.5
    result = Trainer(algo, n_runners=3, engine="tiny", store=f"sqlite:///{db}", run_dir=tmp_path / "run").fit(
        calculator_agent, make_tasks(6, seed=1), make_tasks(2, seed=2)
    )
    history = result.history
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    versions = asyncio.run(_step_versions(str(db)))
    # Each step's calls were all served by one version: weights never changed mid-sampling...
    assert all(len(v) == 1 for v in versions.values()), versions
    # ...and step 2 ran on the base weights (sampled during step 1's update), step 3 on step 2's, step 4 on step 2's.
    served = [next(iter(versions[s])) for s in (1, 2, 3, 4)]
    assert served[0] == served[1] and served[2] == served[3] and served[1] != served[2]
    # Step 2's rollouts were running before step 1's update ended: sampling really overlapped learning.
    store_rollouts = asyncio.run(_enqueue_times(str(db), "s2-"))
    learn_1_end = algo.learning[0][1]
    assert store_rollouts and history[1]["behind"] == 1
    assert min(store_rollouts) < _wall(learn_1_end)


async def _enqueue_times(db: str, prefix: str) -> list[float]:
    store = open_store(db)
    try:
        rollouts = await store.query_rollouts(mode="train", limit=1000)
        return [r.start_time for r in rollouts if r.metadata["group_id"].startswith(prefix)]
    finally:
        await store.close()


def _wall(loop_time: float) -> float:
    """A loop.time() stamp as wall-clock time (the store stamps rollouts with time.time())."""
    import time

    return time.time() - (time.monotonic() - loop_time)
