"""GRPO's settings: the shared learner settings plus the clipped policy-gradient objective's."""

from __future__ import annotations

from dataclasses import dataclass

from agentkiln.training.config import DEFAULT_LORA_TARGETS, LearnerConfig, LoraSettings
from agentkiln.training.losses import GRPOObjective

__all__ = ["DEFAULT_LORA_TARGETS", "GRPOConfig", "LoraSettings"]


@dataclass
class GRPOConfig(LearnerConfig):
    """Hyper-parameters of the update (the learner's are documented on `LearnerConfig`).

    clip_eps_high: upper clip (DAPO "clip-higher"); None = clip_eps.
    kl_coef: weight of the k3 KL estimate to the reference (0 = no reference forward at all).
    epochs: optimizer steps over the same batch (one per epoch; micro-batches accumulate).
    skip_zero_advantage: with kl_coef 0 a zero-advantage transition has zero gradient, so it
        is not forwarded (its tokens still count in the token mean).
    temperature: the sampling temperature the rollouts used; log-probs are taken under the
        same tempered distribution so ratios start at 1 and match the recorded logprobs.
    max_importance_weight: cap on the ratio pi / pi_recorded of a negative-advantage token (dual
        clip, see `losses.grpo_loss`); None = no cap. On-policy rollouts stay near 1, so it
        matters for off-policy data (production calls served by other versions).
    """

    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    kl_coef: float = 0.0
    epochs: int = 1
    skip_zero_advantage: bool = True
    temperature: float = 1.0
    max_importance_weight: float | None = None

    def __post_init__(self) -> None:
        if self.max_importance_weight is not None and not self.max_importance_weight > 1.0:
            raise ValueError("max_importance_weight must be above 1 (it caps a ratio that starts at 1)")

    def objective(self) -> GRPOObjective:
        return GRPOObjective(self)
