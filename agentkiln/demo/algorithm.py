"""The demo's GRPO settings, one place for `kiln demo` and `kiln demo --multi-agent`."""

from __future__ import annotations

from typing import Any, Optional


def build_demo_algorithm(
    *,
    steps: int,
    time_budget_s: Optional[float],
    lr: float,
    tasks_per_step: int,
    samples: int,
    eval_every: int,
    model_dir: Optional[str] = None,
    overlap: bool = True,
    agents: list[str] | None = None,
    agent_rewards: list[str] | None = None,
) -> Any:
    """The demo's GRPO; `agents` trains one LoRA per agent, each on its own reward in `agent_rewards`."""
    from agentkiln.algorithms.grpo import GRPO, GRPOConfig, LoraSettings

    return GRPO(
        agents=agents,
        agent_rewards=agent_rewards,
        model_dir=model_dir,
        temperature=0.7,
        merge_turns=True,  # the answer turn continues the tool-call turn: one transition, shared prompt
        steps=steps,
        time_budget_s=time_budget_s,
        tasks_per_step=tasks_per_step,
        samples_per_task=samples,
        eval_every=eval_every,
        overlap=overlap,  # sample the next step while learning this one (one step off-policy)
        config=GRPOConfig(lr=lr, lora=LoraSettings(r=16, alpha=32), micro_batch_size=8, kl_coef=0.0),
    )
