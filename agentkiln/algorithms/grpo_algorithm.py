"""GRPO as an AgentKiln algorithm: sample groups through the real agent, learn, publish, repeat.

Each step enqueues `samples_per_task` rollouts of `tasks_per_step` tasks (one GRPO group per
task), waits for the runners, adapts the spans into transitions with per-rollout group
advantages, runs one learner update, and publishes the new LoRA adapter as a resources
version that the server's engine swaps in before the next step samples.

With `agents=[...]` it trains one LoRA per agent of a multi-agent program instead (see
agentkiln.algorithms.agent_policies): every step updates each agent's learner on that agent's
calls only and publishes all their adapters in one resources version.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from agentkiln.adapter.credit import CreditConfig
from agentkiln.adapter.transitions import build_batch
from agentkiln.algorithms.agent_policies import (
    BEST_DIR,
    CHECKPOINT_DIR,
    AgentSpec,
    Policy,
    agent_patterns,
    plan_policies,
    published_llms,
)
from agentkiln.algorithms.base import Algorithm, TrainingContext, TrainingResult
from agentkiln.algorithms.grpo import GRPOConfig
from agentkiln.algorithms.rollout_batch import RolloutOutcome, mean_reward, run_rollouts
from agentkiln.models import Resources, ResourcesIn, RolloutConfig, RolloutMode

log = logging.getLogger(__name__)

__all__ = ["BEST_DIR", "CHECKPOINT_DIR", "CURRICULUM_FILE", "GRPO", "HISTORY_FILE"]

HISTORY_FILE = "history.jsonl"
CURRICULUM_FILE = "curriculum.json"
_METRIC_KEYS = ("loss", "transitions", "trained_tokens", "tokens_per_s", "time_s")


@dataclass
class GRPO(Algorithm):
    """GRPO with LoRA (or full fine-tuning) on the model the gateway serves.

    model_dir: weights the learner starts from; must be what the engine serves (None = the
        converted SmolLM2 copy). steps / time_budget_s: stop at whichever comes first.
    eval_every: validate every k steps (and before/after); the best adapter by validation
        reward is kept in run_dir/best and served at the end.
    agent_match: regex over agent names: train the one model on only those agents' calls.
    agents: train a separate LoRA per agent instead: a list of agent names, or a mapping
        name -> regex over recorded agent names. Each agent's adapter is served to its own
        calls only; agents not listed keep the base weights. Exclusive with agent_match.
    """

    model_dir: Optional[str] = None
    steps: int = 30
    tasks_per_step: int = 2
    samples_per_task: int = 8
    config: GRPOConfig = field(default_factory=GRPOConfig)
    credit: CreditConfig = field(default_factory=CreditConfig)
    agent_match: Optional[str] = None
    agents: Optional[AgentSpec] = None
    merge_turns: bool = False
    temperature: float = 1.0
    eval_every: int = 5
    time_budget_s: Optional[float] = None
    rollout_config: RolloutConfig = field(
        default_factory=lambda: RolloutConfig(timeout_s=600, max_attempts=2, retry_on=["unresponsive", "timeout"])
    )
    resume: bool = True
    seed: int = 0
    prompts: dict[str, Any] = field(default_factory=dict)
    # Optional task sampler (agentkiln.algorithms.curriculum.Curriculum); None = shuffled round-robin.
    curriculum: Optional[Any] = None

    def __post_init__(self) -> None:
        if self.agents is not None:  # fail at construction, not after the server has started
            if self.agent_match is not None:
                raise ValueError("give either agent_match (one shared model) or agents (one adapter per agent)")
            agent_patterns(self.agents)

    # ------------------------------------------------------------------ helpers
    def _out_of_time(self, started: float) -> bool:
        return self.time_budget_s is not None and time.monotonic() - started > self.time_budget_s

    def _learner(self) -> Any:
        from dataclasses import replace

        from agentkiln.algorithms.grpo import GRPOLearner
        from agentkiln.engine.model_files import smollm2_dir

        # The learner must score tokens under the distribution the runners sampled from.
        return GRPOLearner(self.model_dir or smollm2_dir(), replace(self.config, temperature=self.temperature))

    async def _publish(
        self, ctx: TrainingContext, policies: Sequence[Policy], adapters: Sequence[Optional[str]], note: dict[str, Any]
    ) -> Resources:
        """Publish one resources version serving `adapters[i]` for `policies[i]`, and wait until it is served."""
        resources = await ctx.store.add_resources(
            ResourcesIn(
                llms=published_llms(ctx.model_name, {"temperature": self.temperature}, policies, adapters),
                prompts=self.prompts,
                metadata={"algorithm": "grpo", **note},
            )
        )
        await ctx.wait_for_resources_served(resources.resources_id)
        for policy, adapter in zip(policies, adapters):
            policy.adapter = adapter
        return resources

    async def _validate(self, ctx: TrainingContext, val_data: Sequence[Any], resources: Resources, tag: str) -> float:
        outcomes = await run_rollouts(
            ctx.store,
            val_data,
            mode=RolloutMode.val,
            resources_id=resources.resources_id,
            config=self.rollout_config,
            group_prefix=f"val-{tag}",
        )
        score = mean_reward(outcomes)
        ctx.on_event("validation", {"tag": tag, "reward": score, "n": len(outcomes)})
        return score

    async def _save_all(self, policies: Sequence[Policy], step: int, checkpoint: bool) -> list[Optional[str]]:
        """Each learner's adapter for `step` (and its checkpoint); returns the adapter folders."""
        paths: list[Optional[str]] = []
        for policy in policies:
            adapter = await asyncio.to_thread(policy.learner.save, policy.adapter_dir(step))
            if checkpoint:
                await asyncio.to_thread(policy.learner.checkpoint, policy.checkpoint)
            paths.append(str(adapter))
        return paths

    # ------------------------------------------------------------------ main loop
    async def run(
        self, ctx: TrainingContext, train_data: Sequence[Any], val_data: Optional[Sequence[Any]] = None
    ) -> TrainingResult:
        if not train_data:
            raise ValueError("GRPO needs at least one training task")
        started = time.monotonic()
        run_dir = Path(ctx.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        policies = plan_policies(run_dir, self.agents, self.agent_match)
        per_agent = self.agents is not None
        for policy in policies:
            policy.learner = await asyncio.to_thread(self._learner)
        result = TrainingResult()
        history_path = run_dir / HISTORY_FILE

        start_step = 0
        if self.resume and any(p.has_checkpoint() for p in policies):
            for policy in policies:
                if policy.has_checkpoint():
                    await asyncio.to_thread(policy.learner.load_checkpoint, policy.checkpoint)
                else:
                    log.warning("no checkpoint for %s in %s; it starts from the base", policy.label, policy.checkpoint)
            if history_path.exists():
                result.history = [json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]
            # The history, not the optimizer, counts steps: a step whose group had no signal
            # makes no optimizer step but still consumed its tasks.
            start_step = result.history[-1]["step"] if result.history else 0
            log.info("resumed GRPO from %s at step %d", run_dir, start_step)
        elif history_path.exists():
            history_path.unlink()

        if start_step > 0:
            adapters = await self._save_all(policies, start_step, checkpoint=False)
            resources = await self._publish(ctx, policies, adapters, {"step": start_step, "resumed": True})
        else:
            resources = await self._publish(ctx, policies, [None] * len(policies), {"step": 0})

        best_val: Optional[float] = None
        if val_data:
            result.val_before = await self._validate(ctx, val_data, resources, "before")
            best_val = result.val_before
            result.best_val = best_val

        rng = random.Random(self.seed)  # same task order as the run being resumed
        order = list(range(len(train_data)))
        rng.shuffle(order)
        cursor = (start_step * self.tasks_per_step) % len(order)
        curriculum_path = run_dir / CURRICULUM_FILE
        if self.curriculum is not None and start_step > 0 and curriculum_path.exists():
            self.curriculum.load(curriculum_path)

        for step in range(start_step + 1, self.steps + 1):
            if self._out_of_time(started):
                log.info("time budget of %.0fs reached after %d steps", self.time_budget_s, step - 1)
                break
            tasks = []
            if self.curriculum is not None:
                tasks = [train_data[i] for i in self.curriculum.sample(train_data, self.tasks_per_step)]
            else:
                for _ in range(self.tasks_per_step):
                    tasks.append(train_data[order[cursor]])
                    cursor = (cursor + 1) % len(order)
            t0 = time.monotonic()
            outcomes = await run_rollouts(
                ctx.store,
                tasks,
                mode=RolloutMode.train,
                resources_id=resources.resources_id,
                samples_per_task=self.samples_per_task,
                config=self.rollout_config,
                group_prefix=f"s{step}",
            )
            sample_s = time.monotonic() - t0
            if self.curriculum is not None:
                k = self.samples_per_task  # run_rollouts returns each task's group contiguously
                for i, task in enumerate(tasks):
                    self.curriculum.record(task, [o.reward for o in outcomes[i * k : (i + 1) * k]])
                self.curriculum.save(curriculum_path)
            metrics = [await self._learn(policy, outcomes) for policy in policies]
            adapters = await self._save_all(policies, step, checkpoint=True)
            resources = await self._publish(ctx, policies, adapters, {"step": step})
            # The engine has loaded this step's adapters; older ones are only disk weight now.
            for policy in policies:
                shutil.rmtree(policy.adapter_dir(step - 2), ignore_errors=True)
            record: dict[str, Any] = {
                "step": step,
                "train_reward": mean_reward(outcomes),
                "sample_s": round(sample_s, 2),
                "elapsed_s": round(time.monotonic() - started, 1),
            }
            if per_agent:
                record["agents"] = {p.label: _step_metrics(m) for p, m in zip(policies, metrics)}
            else:
                record.update(_step_metrics(metrics[0]))
            last = step == self.steps or self._out_of_time(started)
            if val_data and (step % self.eval_every == 0 or last):
                val = await self._validate(ctx, val_data, resources, f"step-{step}")
                record["val_reward"] = val
                if best_val is None or val > best_val:
                    best_val = val
                    for policy, adapter in zip(policies, adapters):
                        await asyncio.to_thread(_replace_dir, Path(adapter), policy.best)
                        policy.best_adapter = str(policy.best)
                    result.best_checkpoint = str(run_dir / BEST_DIR)
                    result.best_val = val
            result.history.append(record)
            with history_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            ctx.on_event("step", record)

        # Serve the best weights found (the base model if training never beat it).
        if val_data:
            best_path = result.best_checkpoint
            resources = await self._publish(ctx, policies, [p.best_adapter for p in policies], {"step": "best"})
            last_val = next((h["val_reward"] for h in reversed(result.history) if "val_reward" in h), None)
            result.val_after = (
                result.best_val if best_path else (last_val if last_val is not None else result.val_before)
            )
        if per_agent:
            result.extra["agent_adapters"] = {p.label: p.adapter for p in policies}
        result.elapsed_s = time.monotonic() - started
        result.extra["final_resources_id"] = resources.resources_id
        return result

    async def _learn(self, policy: Policy, outcomes: Sequence[RolloutOutcome]) -> dict[str, float]:
        """One learner update on the transitions of the calls `policy` trains on."""
        transitions, skipped = build_batch(
            [(o.rollout, o.attempts, o.spans) for o in outcomes],
            agent_match=policy.match,
            credit=self.credit,
            merge=self.merge_turns,
        )
        if skipped:
            reasons: dict[str, int] = {}
            for s in skipped:
                key = getattr(s.reason, "value", str(s.reason))
                reasons[key] = reasons.get(key, 0) + 1
            log.info("adapter left out %d LLM call(s) for %s: %s", len(skipped), policy.label, reasons)
        if not transitions:
            log.warning(
                "no transitions for %s this step (rollouts failed or none of its calls was recorded)", policy.label
            )
            return {"transitions": 0.0}
        return await asyncio.to_thread(policy.learner.update, transitions)


def _step_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {k: metrics[k] for k in _METRIC_KEYS if k in metrics}


def _replace_dir(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
