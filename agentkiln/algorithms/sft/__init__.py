"""SFT on the best runs: `config` (SFTConfig) beside `algorithm` (kiln.SFT)."""

from agentkiln.algorithms.sft.algorithm import SFT, rollout_score, select_best
from agentkiln.algorithms.sft.config import SFTConfig

__all__ = ["SFT", "SFTConfig", "rollout_score", "select_best"]
