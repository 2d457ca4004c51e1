"""Rejection-sampling fine-tuning (SFT on the best runs): keep the top-reward rollouts, imitate them.

Why it exists next to GRPO: it needs no group statistics (one good run is enough), it learns
from traces of any origin (production traffic, a stronger model, an earlier policy), and its
update is a plain cross-entropy, stable at rates where a policy gradient would drift.

It trains the same `Learner` as GRPO with the SFT objective, and runs the same loop
(`agentkiln.training.loop.train_weights`) with rounds instead of steps.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentkiln.adapter.credit import CreditConfig
from agentkiln.adapter.signals import RewardSignals
from agentkiln.adapter.transitions import build_batch
from agentkiln.algorithms.sft.config import SFTConfig
from agentkiln.models import RolloutConfig, Transition
from agentkiln.training.context import Algorithm, TrainingContext, TrainingResult
from agentkiln.training.learner import Learner
from agentkiln.training.loop import WeightsPlan, default_rollout_config, train_weights
from agentkiln.training.policies import Policy
from agentkiln.training.trace import Trace

log = logging.getLogger(__name__)

__all__ = ["SFT", "rollout_score", "select_best"]

_METRIC_KEYS = ("loss", "first_loss", "optimizer_steps", "time_s")


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
    kept = [rid for rid, ts in by_rollout.items() if min_reward is None or rollout_score(ts) >= min_reward]
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


@dataclass
class SFT(Algorithm):
    """Online rejection sampling: each round samples rollouts, keeps the best, fine-tunes, publishes, validates.

    model_dir: weights the learner starts from; must be what the engine serves (None = SmolLM2).
    min_reward / top_k: which rollouts count as demonstrations (see `select_best`).
    The adapter with the best validation reward is kept in run_dir/best and served at the end.
    reward_signals: built-in signals added to the agent's reward before selecting (see GRPO).
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
    rollout_config: RolloutConfig = field(default_factory=default_rollout_config)
    seed: int = 0
    prompts: dict[str, Any] = field(default_factory=dict)
    reward_signals: RewardSignals | Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        self.reward_signals = RewardSignals.of(self.reward_signals)

    def _learner(self) -> Learner:
        from agentkiln.engine.model_files import smollm2_dir

        return Learner(self.model_dir or smollm2_dir(), self.config)

    def _demonstrations(self, traces: Sequence[Trace]) -> tuple[list[Transition], int]:
        transitions, _ = build_batch(
            traces,
            agent_match=self.agent_match,
            credit=self.credit,
            merge=self.merge_turns,
            signals=self.reward_signals,
        )
        kept = select_best(transitions, min_reward=self.min_reward, top_k=self.top_k)
        return kept, len({t.rollout_id for t in kept})

    async def run(
        self, ctx: TrainingContext, train_data: Sequence[Any], val_data: Sequence[Any] | None = None
    ) -> TrainingResult:
        plan = WeightsPlan.of(
            self,
            algorithm="sft",
            unit="round",
            group_prefix="sft",
            steps=self.rounds,
            tasks_per_step=self.tasks_per_round,
        )
        return await train_weights(self, plan, ctx, train_data, val_data)

    async def _learn_step(self, policies: Sequence[Policy], traces: Sequence[Trace]) -> tuple[dict[str, Any], bool]:
        kept, n_kept = self._demonstrations(traces)
        record: dict[str, Any] = {"kept_rollouts": n_kept, "kept_transitions": len(kept)}
        if not kept:
            log.info("no rollout reached the reward threshold; nothing to imitate")
            return record, False
        metrics = await asyncio.to_thread(policies[0].learner.update, kept)
        record.update({k: metrics[k] for k in _METRIC_KEYS if k in metrics})
        return record, True
