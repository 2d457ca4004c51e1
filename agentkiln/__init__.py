"""AgentKiln: an optimization layer that makes AI agents better from their own runs.

`import agentkiln as kiln`; then `@kiln.rollout`, `kiln.emit_reward`, `kiln.Runner`,
`kiln.Trainer(algorithm=kiln.GRPO(...)).fit(agent, train, val)`.
"""

from typing import Any

from agentkiln.runner import (
    Agent,
    CommandAgent,
    LLMError,
    LLMHandle,
    LoopDetected,
    ParseError,
    Runner,
    ToolError,
    ToolTimeout,
    current_agent,
    emit_exception,
    emit_message,
    emit_object,
    emit_reward,
    emit_span,
    rollout,
    tool,
)
from agentkiln.runner import (
    agent_scope as agent,
)

__version__ = "0.1.0"

# Training pieces pull in torch: import them only when used.
_LAZY = {
    "Trainer": "agentkiln.trainer",
    "GRPO": "agentkiln.algorithms.grpo.algorithm",
    "GRPOConfig": "agentkiln.algorithms.grpo.config",
    "LoraSettings": "agentkiln.training.config",
    "CreditConfig": "agentkiln.adapter.credit",
    "RewardSignals": "agentkiln.adapter.signals",
    "APO": "agentkiln.algorithms.apo.algorithm",
    "GEPA": "agentkiln.algorithms.gepa.algorithm",
    "GEPAConfig": "agentkiln.algorithms.gepa.config",
    "SFT": "agentkiln.algorithms.sft.algorithm",
    "SFTConfig": "agentkiln.algorithms.sft.config",
    "Curriculum": "agentkiln.algorithms.curriculum",
    "open_store": "agentkiln.store",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'agentkiln' has no attribute {name!r}")


__all__ = [
    "Agent",
    "CommandAgent",
    "LLMError",
    "LLMHandle",
    "LoopDetected",
    "ParseError",
    "Runner",
    "ToolError",
    "ToolTimeout",
    "agent",
    "current_agent",
    "emit_exception",
    "emit_message",
    "emit_object",
    "emit_reward",
    "emit_span",
    "rollout",
    "tool",
    *_LAZY,
]
