"""GRPO as an AgentKiln algorithm: sample groups through the real agent, learn, publish, repeat.

Each step enqueues `samples_per_task` rollouts of `tasks_per_step` tasks (one GRPO group per
task), waits for the runners, adapts the spans into transitions with per-rollout group
advantages, runs one learner update, and publishes the new LoRA adapter as a resources
version that the server's engine swaps in before the next step samples (the loop itself is
`agentkiln.training.loop.train_weights`, shared with SFT).

With `agents=[...]` it trains one LoRA per agent of a multi-agent program instead (see
agentkiln.training.policies): every step updates each agent's learner on that agent's calls
only and publishes all their adapters in one resources version.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from agentkiln.adapter.credit import CreditConfig
from agentkiln.adapter.signals import RewardSignals
from agentkiln.adapter.transitions import build_batch
from agentkiln.algorithms.grpo.config import GRPOConfig
from agentkiln.models import RolloutConfig
from agentkiln.training.context import Algorithm, TrainingContext, TrainingResult
from agentkiln.training.learner import Learner
from agentkiln.training.loop import WeightsPlan, default_rollout_config, train_weights
from agentkiln.training.policies import AgentSpec, Policy, agent_patterns
from agentkiln.training.trace import Trace, skip_counts

log = logging.getLogger(__name__)

__all__ = ["GRPO"]

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
    curriculum: optional task sampler (agentkiln.algorithms.curriculum.Curriculum); None =
        shuffled round-robin.
    overlap: sample the next step while the learner updates on this one (one step
        off-policy: the clipped ratio against the recorded sampling logprobs corrects for the
        lag; weights change only between sampling phases). False = strictly on-policy.
    reward_signals: built-in signals added to the agent's reward, e.g. {"tool_success": 0.2,
        "latency": 0.1} or a RewardSignals (agentkiln/adapter/signals.py); None: the reward as emitted.
    agent_rewards: with `agents`, which reward each agent's LoRA learns from, so each agent is
        credited with its own share of the outcome rather than the whole team's score: agent
        name -> reward name (the agent code emits it, `kiln.emit_reward(x, name=...)`), or a list
        of agent names whose rewards are named after them. Agents left out learn from the
        rollout's reward (`credit.reward_name`). Validation and train reward stay the rollout's.
    """

    model_dir: str | None = None
    steps: int = 30
    tasks_per_step: int = 2
    samples_per_task: int = 8
    config: GRPOConfig = field(default_factory=GRPOConfig)
    credit: CreditConfig = field(default_factory=CreditConfig)
    agent_match: str | None = None
    agents: AgentSpec | None = None
    merge_turns: bool = False
    temperature: float = 1.0
    eval_every: int = 5
    time_budget_s: float | None = None
    rollout_config: RolloutConfig = field(default_factory=default_rollout_config)
    resume: bool = True
    seed: int = 0
    prompts: dict[str, Any] = field(default_factory=dict)
    curriculum: Any | None = None
    overlap: bool = False
    reward_signals: RewardSignals | Mapping[str, float] | None = None
    agent_rewards: Mapping[str, str] | Sequence[str] | None = None

    def __post_init__(self) -> None:
        self.reward_signals = RewardSignals.of(self.reward_signals)
        if self.agents is not None:  # fail at construction, not after the server has started
            if self.agent_match is not None:
                raise ValueError("give either agent_match (one shared model) or agents (one adapter per agent)")
            agent_patterns(self.agents)
        self.agent_rewards = _agent_rewards(self.agent_rewards, self.agents)

    def _learner(self) -> Learner:
        from agentkiln.engine.model_files import smollm2_dir

        # The learner must score tokens under the distribution the runners sampled from.
        return Learner(self.model_dir or smollm2_dir(), replace(self.config, temperature=self.temperature))

    async def run(
        self, ctx: TrainingContext, train_data: Sequence[Any], val_data: Sequence[Any] | None = None
    ) -> TrainingResult:
        plan = WeightsPlan.of(self, algorithm="grpo", unit="step", group_prefix="s", checkpoint=True)
        return await train_weights(self, plan, ctx, train_data, val_data)

    async def _learn_step(self, policies: Sequence[Policy], traces: Sequence[Trace]) -> tuple[dict[str, Any], bool]:
        metrics = [await self._learn(policy, traces) for policy in policies]
        if self.agents is not None:
            return {"agents": {p.label: _step_metrics(m) for p, m in zip(policies, metrics)}}, True
        return _step_metrics(metrics[0]), True

    async def _learn(self, policy: Policy, traces: Sequence[Trace]) -> dict[str, float]:
        """One learner update on the transitions of the calls `policy` trains on."""
        transitions, skipped = build_batch(
            traces,
            agent_match=policy.match,
            credit=self._credit(policy),
            merge=self.merge_turns,
            signals=self.reward_signals,
        )
        if skipped:
            log.info("adapter left out %d LLM call(s) for %s: %s", len(skipped), policy.label, skip_counts(skipped))
        if not transitions:
            log.warning(
                "no transitions for %s this step (rollouts failed or none of its calls was recorded)", policy.label
            )
            return {"transitions": 0.0}
        return await asyncio.to_thread(policy.learner.update, transitions)


    def _credit(self, policy: Policy) -> CreditConfig:
        """The credit config of `policy`: its own reward when `agent_rewards` names one."""
        reward = (self.agent_rewards or {}).get(policy.agent or "")
        return self.credit if reward is None else replace(self.credit, reward_name=reward)


def _agent_rewards(spec: Mapping[str, str] | Sequence[str] | None, agents: AgentSpec | None) -> dict[str, str] | None:
    """agent -> reward name, checked against `agents` (a list names each agent's reward after it)."""
    if spec is None:
        return None
    if agents is None:
        raise ValueError("agent_rewards needs agents=[...] (one LoRA per agent)")
    if isinstance(spec, str):
        raise TypeError("agent_rewards must be a list of agent names or an agent -> reward name mapping")
    rewards = {str(k): str(v) for k, v in spec.items()} if isinstance(spec, Mapping) else {str(a): str(a) for a in spec}
    unknown = sorted(set(rewards) - set(agent_patterns(agents)))
    if unknown:
        raise ValueError(f"agent_rewards names agents that are not trained: {unknown}")
    return rewards


def _step_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {k: metrics[k] for k in _METRIC_KEYS if k in metrics}
