"""GRPO: `config` (GRPOConfig, LoraSettings) beside `algorithm` (kiln.GRPO)."""

from agentkiln.algorithms.grpo.algorithm import GRPO
from agentkiln.algorithms.grpo.config import GRPOConfig, LoraSettings

__all__ = ["GRPO", "GRPOConfig", "LoraSettings"]
