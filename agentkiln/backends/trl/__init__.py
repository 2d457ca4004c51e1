"""TRL as a training backend: TRL's SFT, DPO and GRPO trainers on AgentKiln's recorded tokens."""

from agentkiln.backends.trl.config import TRLBackendConfig
from agentkiln.backends.trl.train import TRLResult, train_with_trl

__all__ = ["TRLBackendConfig", "TRLResult", "train_with_trl"]
