"""SFT's settings: the shared learner settings plus the imitation objective's."""

from __future__ import annotations

from dataclasses import dataclass

from agentkiln.training.config import LearnerConfig
from agentkiln.training.losses import SFTObjective

__all__ = ["SFTConfig"]


@dataclass
class SFTConfig(LearnerConfig):
    """Cross-entropy fine-tuning settings (the learner's are documented on `LearnerConfig`).

    batch_size: transitions per optimizer step; epochs: passes over the kept transitions;
    seed: the shuffle of each pass.
    """

    epochs: int = 2
    batch_size: int = 16
    seed: int = 0

    def objective(self) -> SFTObjective:
        return SFTObjective(self)
