"""Rejection-sampling fine-tuning (SFT on the best runs): keep the top-reward rollouts, imitate them.

Why it exists next to GRPO: it needs no group statistics (one good run is enough), it learns
from traces of any origin (production traffic, a stronger model, an earlier policy), and its
update is a plain cross-entropy, stable at rates where a policy gradient would drift.

The learner is a `GRPOLearner` with a different loss, so model loading, LoRA, the
sampled-token-only log-probs, save and checkpoint are shared rather than copied.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from agentkiln.adapter.credit import CreditConfig
from agentkiln.adapter.transitions import build_batch
from agentkiln.algorithms.base import Algorithm, TrainingContext, TrainingResult
from agentkiln.algorithms.grpo import GRPOConfig, GRPOLearner, LoraSettings, _collate
from agentkiln.algorithms.rollout_batch import RolloutOutcome, mean_reward, run_rollouts
from agentkiln.models import LLMEndpoint, Resources, ResourcesIn, RolloutConfig, RolloutMode, Transition

log = logging.getLogger(__name__)

BEST_DIR = "best"
HISTORY_FILE = "history.jsonl"


@dataclass
class SFTConfig:
    """Cross-entropy fine-tuning settings.

    batch_size: transitions per optimizer step; epochs: passes over the kept transitions.
    """

    lr: float = 1e-4
    epochs: int = 2
    batch_size: int = 16
    micro_batch_size: int = 8
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    lora: LoraSettings | None = field(default_factory=LoraSettings)
    bf16: bool = True
    share_prompt: bool = True
    seed: int = 0

    def learner_config(self) -> GRPOConfig:
        # temperature 1: imitation maximises the plain (untempered) likelihood.
        return GRPOConfig(
            lr=self.lr,
            micro_batch_size=self.micro_batch_size,
            max_grad_norm=self.max_grad_norm,
            weight_decay=self.weight_decay,
            lora=self.lora,
            bf16=self.bf16,
            share_prompt=self.share_prompt,
            kl_coef=0.0,
            temperature=1.0,
        )


class SFTLearner(GRPOLearner):
    """GRPOLearner whose update is the token-mean negative log-likelihood of the masked response tokens."""

    def __init__(self, model_dir: str | Path, config: SFTConfig | None = None) -> None:
        self.sft_config = config or SFTConfig()
        super().__init__(model_dir, self.sft_config.learner_config())
        self._rng = random.Random(self.sft_config.seed)

    def update(self, transitions: Sequence[Transition]) -> dict[str, float]:
        """`epochs` passes over the transitions in shuffled batches of `batch_size`; returns metrics."""
        cfg = self.sft_config
        t0 = time.perf_counter()
        items = [self._item(t) for t in transitions]
        items = [it for it in items if sum(it.mask) > 0]
        metrics: dict[str, float] = {"transitions": float(len(items))}
        if not items:
            log.warning("SFT update skipped: no trainable tokens")
            return {**metrics, "optimizer_steps": 0.0, "trained_tokens": 0.0}
        losses: list[float] = []
        steps, tokens, forwarded = 0, 0.0, 0
        for _ in range(max(1, cfg.epochs)):
            order = list(range(len(items)))
            self._rng.shuffle(order)
            for start in range(0, len(order), max(1, cfg.batch_size)):
                chunk = [items[i] for i in order[start : start + cfg.batch_size]]
                total = sum(sum(it.mask) for it in chunk)
                self.optimizer.zero_grad(set_to_none=True)
                loss_sum = 0.0
                for idx in self._micro_batches(chunk):
                    batch = _collate([chunk[i] for i in idx], self.pad_id, self.config.share_prompt)
                    lp = self._token_logprobs(self.model, batch)
                    loss = -(lp * batch.mask).sum() / total
                    loss.backward()
                    loss_sum += float(loss.detach())
                    forwarded += batch.tokens
                stepped, _ = self._optimizer_step(cfg.max_grad_norm)
                if not stepped:
                    continue
                steps += 1
                tokens += total
                losses.append(loss_sum)
        elapsed = time.perf_counter() - t0
        self.tokens_seen += forwarded
        metrics.update(
            loss=losses[-1] if losses else float("nan"),
            first_loss=losses[0] if losses else float("nan"),
            optimizer_steps=float(steps),
            trained_tokens=tokens / max(1, cfg.epochs),
            step=float(self.step),
            time_s=elapsed,
            tokens_per_s=forwarded / elapsed if elapsed > 0 else 0.0,
        )
        log.info("SFT step %d: %s", self.step, {k: round(v, 4) for k, v in metrics.items()})
        return metrics


def rollout_score(transitions: Sequence[Transition]) -> float:
    """A rollout's return: that of its first transition (the full return in both credit modes)."""
    return min(transitions, key=lambda t: t.step).return_


def select_best(
    transitions: Sequence[Transition], *, min_reward: float | None = 1.0, top_k: int | None = None
) -> list[Transition]:
    """Transitions of the rollouts worth imitating.

    min_reward: keep rollouts whose return is at least this (None = no threshold).
    top_k: then keep at most k rollouts per group (task), highest return first, ties in input order.
    """
    by_rollout: dict[str, list[Transition]] = {}
    for t in transitions:
        by_rollout.setdefault(t.rollout_id, []).append(t)
    kept = [
        rid for rid, ts in by_rollout.items() if min_reward is None or rollout_score(ts) >= min_reward
    ]
    if top_k is not None:
        groups: dict[str, list[str]] = {}
        for rid in kept:
            groups.setdefault(by_rollout[rid][0].group_id or rid, []).append(rid)
        chosen: set[str] = set()
        for rids in groups.values():
            rids.sort(key=lambda r: -rollout_score(by_rollout[r]))  # stable: ties keep input order
            chosen.update(rids[:top_k])
        kept = [rid for rid in kept if rid in chosen]
    return [t for rid in kept for t in by_rollout[rid]]


def replace_dir(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


@dataclass
class SFT(Algorithm):
    """Online rejection sampling: each round samples rollouts, keeps the best, fine-tunes, publishes, validates.

    model_dir: weights the learner starts from; must be what the engine serves (None = SmolLM2).
    min_reward / top_k: which rollouts count as demonstrations (see `select_best`).
    The adapter with the best validation reward is kept in run_dir/best and served at the end.
    """

    model_dir: str | None = None
    rounds: int = 5
    tasks_per_round: int = 4
    samples_per_task: int = 4
    min_reward: float | None = 1.0
    top_k: int | None = None
    config: SFTConfig = field(default_factory=SFTConfig)
    credit: CreditConfig = field(default_factory=CreditConfig)
    agent_match: str | None = None
    merge_turns: bool = False
    temperature: float = 1.0
    eval_every: int = 1
    time_budget_s: float | None = None
    rollout_config: RolloutConfig = field(
        default_factory=lambda: RolloutConfig(timeout_s=600, max_attempts=2, retry_on=["unresponsive", "timeout"])
    )
    seed: int = 0
    prompts: dict[str, Any] = field(default_factory=dict)

    def _learner(self) -> SFTLearner:
        from agentkiln.engine.model_files import smollm2_dir

        return SFTLearner(self.model_dir or smollm2_dir(), self.config)

    async def _publish(self, ctx: TrainingContext, adapter: str | None, note: dict[str, Any]) -> Resources:
        resources = await ctx.store.add_resources(
            ResourcesIn(
                llms={
                    "main": LLMEndpoint(
                        model=ctx.model_name, sampling={"temperature": self.temperature}, adapter_path=adapter
                    )
                },
                prompts=self.prompts,
                metadata={"algorithm": "sft", **note},
            )
        )
        await ctx.wait_for_resources_served(resources.resources_id)
        return resources

    async def _validate(self, ctx: TrainingContext, val_data: Sequence[Any], resources: Resources, tag: str) -> float:
        outcomes = await run_rollouts(
            ctx.store, val_data, mode=RolloutMode.val, resources_id=resources.resources_id,
            config=self.rollout_config, group_prefix=f"val-{tag}",
        )
        score = mean_reward(outcomes)
        ctx.on_event("validation", {"tag": tag, "reward": score, "n": len(outcomes)})
        return score

    def _demonstrations(self, outcomes: Sequence[RolloutOutcome]) -> tuple[list[Transition], int]:
        transitions, _ = build_batch(
            [(o.rollout, o.attempts, o.spans) for o in outcomes],
            agent_match=self.agent_match, credit=self.credit, merge=self.merge_turns,
        )
        kept = select_best(transitions, min_reward=self.min_reward, top_k=self.top_k)
        return kept, len({t.rollout_id for t in kept})

    async def run(
        self, ctx: TrainingContext, train_data: Sequence[Any], val_data: Sequence[Any] | None = None
    ) -> TrainingResult:
        if not train_data:
            raise ValueError("SFT needs at least one training task")
        started = time.monotonic()
        run_dir = Path(ctx.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        history_path = run_dir / HISTORY_FILE
        history_path.unlink(missing_ok=True)
        learner = await asyncio.to_thread(self._learner)
        result = TrainingResult()
        resources = await self._publish(ctx, None, {"round": 0})
        if val_data:
            result.val_before = result.best_val = await self._validate(ctx, val_data, resources, "before")

        rng = random.Random(self.seed)
        order = list(range(len(train_data)))
        rng.shuffle(order)
        cursor = 0
        for rnd in range(1, self.rounds + 1):
            if self.time_budget_s is not None and time.monotonic() - started > self.time_budget_s:
                log.info("time budget of %.0fs reached after %d rounds", self.time_budget_s, rnd - 1)
                break
            tasks = [train_data[order[(cursor + i) % len(order)]] for i in range(self.tasks_per_round)]
            cursor = (cursor + self.tasks_per_round) % len(order)
            t0 = time.monotonic()
            outcomes = await run_rollouts(
                ctx.store, tasks, mode=RolloutMode.train, resources_id=resources.resources_id,
                samples_per_task=self.samples_per_task, config=self.rollout_config, group_prefix=f"sft{rnd}",
            )
            sample_s = time.monotonic() - t0
            kept, n_kept = self._demonstrations(outcomes)
            record: dict[str, Any] = {
                "round": rnd,
                "train_reward": mean_reward(outcomes),
                "kept_rollouts": n_kept,
                "kept_transitions": len(kept),
                "sample_s": round(sample_s, 2),
            }
            if kept:
                metrics = await asyncio.to_thread(learner.update, kept)
                record.update({k: metrics[k] for k in ("loss", "first_loss", "optimizer_steps", "time_s") if k in metrics})
                adapter = await asyncio.to_thread(learner.save, run_dir / "adapters" / f"round-{rnd}")
                resources = await self._publish(ctx, str(adapter), {"round": rnd})
                shutil.rmtree(run_dir / "adapters" / f"round-{rnd - 2}", ignore_errors=True)
                last = rnd == self.rounds
                if val_data and (rnd % self.eval_every == 0 or last):
                    val = await self._validate(ctx, val_data, resources, f"round-{rnd}")
                    record["val_reward"] = val
                    if result.best_val is None or val > result.best_val:
                        result.best_val = val
                        await asyncio.to_thread(replace_dir, Path(adapter), run_dir / BEST_DIR)
                        result.best_checkpoint = str(run_dir / BEST_DIR)
            else:
                log.info("round %d: no rollout reached the reward threshold; nothing to imitate", rnd)
            record["elapsed_s"] = round(time.monotonic() - started, 1)
            result.history.append(record)
            with history_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            ctx.on_event("step", {"step": rnd, **record})

        if val_data:
            resources = await self._publish(ctx, result.best_checkpoint, {"round": "best"})
            result.val_after = result.best_val
        result.elapsed_s = time.monotonic() - started
        result.extra["final_resources_id"] = resources.resources_id
        return result
