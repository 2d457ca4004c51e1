"""DPO on preference pairs: `config` (DPOConfig) beside `algorithm` (PreferencePair, train_dpo)."""

from agentkiln.algorithms.dpo.algorithm import DPOResult, PreferencePair, train_dpo
from agentkiln.algorithms.dpo.config import DPOConfig

__all__ = ["DPOConfig", "DPOResult", "PreferencePair", "train_dpo"]
