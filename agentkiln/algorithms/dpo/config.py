"""DPO's settings: the shared learner settings plus the preference objective's."""

from __future__ import annotations

from dataclasses import dataclass

from agentkiln.training.config import LearnerConfig
from agentkiln.training.losses import DPOObjective

__all__ = ["DPOConfig"]


@dataclass
class DPOConfig(LearnerConfig):
    """Direct preference optimisation settings (the learner's are documented on `LearnerConfig`).

    beta: strength of the implicit KL to the reference (TRL's default 0.1); larger keeps the
        policy closer to the base model. With LoRA the reference is the base model with the
        adapter switched off; a full fine-tune loads a frozen second copy.
    batch_size: pairs per optimizer step; epochs: passes over the pairs; seed: the shuffle.
    """

    beta: float = 0.1
    epochs: int = 1
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError("beta must be positive")

    def objective(self) -> DPOObjective:
        return DPOObjective(self)
