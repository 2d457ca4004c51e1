"""The training loop every algorithm shares: publish, sample, validate, history, best, resume.

`Run` is one run's bookkeeping (GRPO, SFT and APO all use it): publishing a resources version
and waiting until the engine serves it, running rollouts, scoring validation, appending
history.jsonl. `train_weights` is the loop of the algorithms that change weights (GRPO, SFT):
each step samples rollouts under the latest weights, lets the algorithm learn from them, saves
and publishes the adapters, validates every `eval_every` steps, keeps the best adapters in
run_dir/best, and serves those at the end. With `resume`, it continues from the checkpoints
and history a previous run of the same folder left.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agentkiln.models import LLMEndpoint, PromptTemplate, Resources, ResourcesIn, RolloutConfig, RolloutMode
from agentkiln.training.context import TrainingContext, TrainingResult
from agentkiln.training.policies import BEST_DIR, Policy, plan_policies, published_llms
from agentkiln.training.trace import Trace, mean_reward, named_rewards, run_rollouts, sampled_tokens

log = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"
CURRICULUM_FILE = "curriculum.json"


def default_rollout_config() -> RolloutConfig:
    """Rollouts of training runs: a generous timeout, one retry of a lost or timed-out runner."""
    return RolloutConfig(timeout_s=600, max_attempts=2, retry_on=["unresponsive", "timeout"])


class Run:
    """One run's bookkeeping: the run folder, the clock, publications, rollouts, history."""

    def __init__(self, ctx: TrainingContext, algorithm: str, rollout_config: RolloutConfig) -> None:
        self.ctx = ctx
        self.algorithm = algorithm
        self.rollout_config = rollout_config
        self.run_dir = Path(ctx.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.result = TrainingResult()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def out_of_time(self, budget_s: float | None) -> bool:
        return budget_s is not None and self.elapsed() > budget_s

    async def publish(
        self, llms: dict[str, LLMEndpoint], prompts: dict[str, PromptTemplate | str], note: dict[str, Any]
    ) -> Resources:
        """Add a resources version and wait until the engine serves it (no rollout runs on stale weights)."""
        resources = await self.ctx.store.add_resources(
            ResourcesIn(llms=llms, prompts=prompts, metadata={"algorithm": self.algorithm, **note})
        )
        await self.ctx.wait_for_resources_served(resources.resources_id)
        return resources

    async def rollouts(
        self, tasks: Sequence[Any], resources_id: str, mode: RolloutMode, group_prefix: str, samples_per_task: int = 1
    ) -> list[Trace]:
        return await run_rollouts(
            self.ctx.store,
            tasks,
            mode=mode,
            resources_id=resources_id,
            samples_per_task=samples_per_task,
            config=self.rollout_config,
            group_prefix=group_prefix,
        )

    async def validate(self, tasks: Sequence[Any], resources_id: str, tag: str, group_prefix: str = "") -> float:
        """Mean reward of one rollout per validation task under `resources_id`, reported as an event."""
        traces = await self.rollouts(tasks, resources_id, RolloutMode.val, group_prefix or f"val-{tag}")
        score = mean_reward(traces)
        event: dict[str, Any] = {"tag": tag, "reward": score, "n": len(traces)}
        named = named_rewards(traces)
        if named:  # e.g. each agent's share of a multi-agent score; kept per validation in result.extra
            event["rewards"] = named
            self.result.extra.setdefault("val_rewards", {})[tag] = named
        self.ctx.on_event("validation", event)
        return score

    # ------------------------------------------------------------------ history
    @property
    def history_path(self) -> Path:
        return self.run_dir / HISTORY_FILE

    def reset_history(self) -> None:
        """A fresh run: drop the records a previous run of this folder left."""
        self.history_path.unlink(missing_ok=True)

    def restore_history(self) -> list[dict[str, Any]]:
        """The records of the run being resumed (also kept in result.history)."""
        path = self.history_path
        if path.exists():
            self.result.history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return self.result.history

    def record(self, unit: str, record: dict[str, Any]) -> None:
        """Append a step's record to history.jsonl and the result, and report it as a "step" event."""
        self.result.history.append(record)
        with self.history_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.ctx.on_event("step", {"step": record[unit], **record})


# --------------------------------------------------------------------------- weight-training loop


@dataclass
class WeightsPlan:
    """What `train_weights` needs to know of a GRPO / SFT configuration.

    unit: what a step is called in records, metadata and adapter folders ("step", "round").
    checkpoint: write each learner's checkpoint after every step (what `resume` reads).
    overlap: sample step k+1 while learning step k (one step off-policy); a step that validates
        samples the next one afterwards, under the weights it validated.
    """

    algorithm: str
    unit: str
    group_prefix: str
    steps: int
    tasks_per_step: int
    samples_per_task: int
    temperature: float
    prompts: dict[str, Any]
    eval_every: int
    time_budget_s: float | None
    rollout_config: RolloutConfig
    seed: int = 0
    resume: bool = False
    checkpoint: bool = False
    agents: Any = None
    agent_match: str | None = None
    curriculum: Any = None
    overlap: bool = False

    @classmethod
    def of(cls, algo: Any, **fields: Any) -> WeightsPlan:
        """The plan with every field `algo` has under the same name taken from it, then `fields`."""
        names = cls.__dataclass_fields__.keys() - fields.keys()
        return cls(**{n: getattr(algo, n) for n in names if hasattr(algo, n)}, **fields)


class WeightsAlgorithm(Protocol):
    def _learner(self) -> Any: ...

    async def _learn_step(self, policies: Sequence[Policy], traces: Sequence[Trace]) -> tuple[dict[str, Any], bool]:
        """Learn from one step's rollouts: (fields for the step's record, whether weights changed)."""
        ...


def _replace_dir(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


class _TaskPicker:
    """Tasks of each step: from the curriculum, else a seeded shuffle walked round-robin (a resumed
    run continues where the interrupted one was)."""

    def __init__(self, plan: WeightsPlan, tasks: Sequence[Any], start_step: int, run_dir: Path) -> None:
        self.plan, self.tasks, self.path = plan, tasks, run_dir / CURRICULUM_FILE
        self.order = list(range(len(tasks)))
        random.Random(plan.seed).shuffle(self.order)
        self.cursor = (start_step * plan.tasks_per_step) % len(self.order)
        if plan.curriculum is not None and start_step > 0 and self.path.exists():
            plan.curriculum.load(self.path)

    def next(self) -> list[Any]:
        if self.plan.curriculum is not None:
            return [self.tasks[i] for i in self.plan.curriculum.sample(self.tasks, self.plan.tasks_per_step)]
        out = []
        for _ in range(self.plan.tasks_per_step):
            out.append(self.tasks[self.order[self.cursor]])
            self.cursor = (self.cursor + 1) % len(self.order)
        return out

    def record(self, tasks: Sequence[Any], traces: Sequence[Trace]) -> None:
        if self.plan.curriculum is None:
            return
        k = self.plan.samples_per_task  # each task's group is contiguous in `traces`
        for i, task in enumerate(tasks):
            self.plan.curriculum.record(task, [t.reward for t in traces[i * k : (i + 1) * k]])
        self.plan.curriculum.save(self.path)


@dataclass
class _Sampled:
    traces: list[Trace]
    seconds: float
    behind: int  # how many weight versions the sampling policy lags the learner when it learns from these


async def _sample(
    run: Run, plan: WeightsPlan, picker: _TaskPicker, step: int, resources_id: str, weights_step: int
) -> _Sampled:
    """One step's rollouts under the weights of `weights_step` (tasks are picked in step order, so
    overlapping does not change which tasks a step gets)."""
    tasks = picker.next()
    t0 = time.monotonic()
    traces = await run.rollouts(tasks, resources_id, RolloutMode.train, f"{plan.group_prefix}{step}", plan.samples_per_task)
    picker.record(tasks, traces)
    return _Sampled(traces, round(time.monotonic() - t0, 2), step - 1 - weights_step)


async def train_weights(
    algo: WeightsAlgorithm, plan: WeightsPlan, ctx: TrainingContext, train_data: Sequence[Any], val_data: Any
) -> TrainingResult:
    if not train_data:
        raise ValueError(f"{plan.algorithm.upper()} needs at least one training task")
    run = Run(ctx, plan.algorithm, plan.rollout_config)
    result, unit = run.result, plan.unit
    policies = plan_policies(run.run_dir, plan.agents, plan.agent_match)
    for policy in policies:
        policy.learner = await asyncio.to_thread(algo._learner)

    async def save_all(step: int, checkpoint: bool) -> list[str | None]:
        paths: list[str | None] = []
        for policy in policies:
            paths.append(str(await asyncio.to_thread(policy.learner.save, policy.adapter_dir(step, unit))))
            if checkpoint:
                await asyncio.to_thread(policy.learner.checkpoint, policy.checkpoint)
        return paths

    async def publish(adapters: Sequence[str | None], note: dict[str, Any]) -> Resources:
        llms = published_llms(ctx.model_name, {"temperature": plan.temperature}, policies, adapters)
        resources = await run.publish(llms, plan.prompts, note)
        for policy, adapter in zip(policies, adapters):
            policy.adapter = adapter
        return resources

    start = 0
    if plan.resume and any(p.has_checkpoint() for p in policies):
        for policy in policies:
            if policy.has_checkpoint():
                await asyncio.to_thread(policy.learner.load_checkpoint, policy.checkpoint)
            else:
                log.warning("no checkpoint for %s in %s; it starts from the base", policy.label, policy.checkpoint)
        # The history, not the optimizer, counts steps: a step whose group had no signal
        # makes no optimizer step but still consumed its tasks.
        history = run.restore_history()
        start = history[-1][unit] if history else 0
        log.info("resumed %s from %s at %s %d", plan.algorithm, run.run_dir, unit, start)
    else:
        run.reset_history()
    if start > 0:
        resources = await publish(await save_all(start, checkpoint=False), {unit: start, "resumed": True})
    else:
        resources = await publish([None] * len(policies), {unit: 0})
    if val_data:
        result.val_before = result.best_val = await run.validate(val_data, resources.resources_id, "before")

    picker = _TaskPicker(plan, train_data, start, run.run_dir)

    weights_step = start  # the step whose weights the engine serves

    def sample(step: int) -> asyncio.Task[_Sampled]:
        return asyncio.create_task(_sample(run, plan, picker, step, resources.resources_id, weights_step))

    pending = sample(start + 1) if start < plan.steps else None
    for step in range(start + 1, plan.steps + 1):
        if pending is None:
            log.info("time budget of %.0fs reached after %d %ss", plan.time_budget_s, step - 1, unit)
            break
        sampled = await pending
        # One step off-policy: the next step samples under the weights this step learns from while
        # the learner works; the recorded logprobs give the importance ratio, and new weights are
        # only swapped in between sampling phases (no rollout sees two versions).
        more = step < plan.steps and not run.out_of_time(plan.time_budget_s)
        due = bool(val_data) and (step % plan.eval_every == 0 or not more)
        pending = sample(step + 1) if more and plan.overlap and not due else None
        traces = sampled.traces
        record: dict[str, Any] = {unit: step, "train_reward": mean_reward(traces), "sample_s": sampled.seconds}
        if named := named_rewards(traces):
            record["train_rewards"] = named
        tokens = sampled_tokens(traces)
        record.update(sample_tokens=tokens, sample_tokens_per_s=round(tokens / sampled.seconds, 1) if sampled.seconds > 0 else 0.0)
        if plan.overlap:
            record["behind"] = sampled.behind
        t0 = time.monotonic()
        learned, changed = await algo._learn_step(policies, traces)
        record.update(learned)
        record["learn_s"] = round(time.monotonic() - t0, 2)
        if changed:
            adapters = await save_all(step, checkpoint=plan.checkpoint)
            if pending is not None:
                await asyncio.wait([pending])  # the engine swaps weights only between sampling phases
            resources = await publish(adapters, {unit: step})
            weights_step = step
            # The engine has loaded this step's adapters; older ones are only disk weight now.
            for policy in policies:
                shutil.rmtree(policy.adapter_dir(step - 2, unit), ignore_errors=True)
            # Overlapped, the last step is known when its successor would have started sampling.
            last = not more if plan.overlap else step == plan.steps or run.out_of_time(plan.time_budget_s)
            if val_data and (step % plan.eval_every == 0 or last):
                val = record["val_reward"] = await run.validate(val_data, resources.resources_id, f"{unit}-{step}")
                if f"{unit}-{step}" in result.extra.get("val_rewards", {}):
                    record["val_rewards"] = result.extra["val_rewards"][f"{unit}-{step}"]
                if result.best_val is None or val > result.best_val:
                    for policy, adapter in zip(policies, adapters):
                        await asyncio.to_thread(_replace_dir, Path(adapter), policy.best)
                        policy.best_adapter = str(policy.best)
                    result.best_checkpoint = str(run.run_dir / BEST_DIR)
                    result.best_val = val
        record["elapsed_s"] = round(run.elapsed(), 1)
        run.record(unit, record)
        if pending is None and step < plan.steps and not run.out_of_time(plan.time_budget_s):
            pending = sample(step + 1)  # sequential, or right after a validation

    # Serve the best weights found (the base model if training never beat it).
    if val_data:
        resources = await publish([p.best_adapter for p in policies], {unit: "best"})
        result.val_after = result.best_val
    if plan.agents is not None:
        result.extra["agent_adapters"] = {p.label: p.adapter for p in policies}
    result.elapsed_s = run.elapsed()
    result.extra["final_resources_id"] = resources.resources_id
    return result
