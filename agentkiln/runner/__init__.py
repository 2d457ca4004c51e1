"""Client side of AgentKiln: run agents on rollouts and record what they did.

Public API (re-exported as `kiln.*`): the `rollout` decorator and `Agent` class, the
`emit_*` functions, failure types and `tool`, agent naming
(`agent_scope`, exported as `kiln.agent`), `Runner`, and the `CommandAgent` sidecar.
"""

from agentkiln.runner.agent import Agent, LLMHandle, import_agent, rollout
from agentkiln.runner.emit import emit_exception, emit_message, emit_object, emit_reward, emit_span
from agentkiln.runner.failures import LLMError, LoopDetected, ParseError, ToolError, ToolTimeout, classify

# Exported as `agent_scope` here (the name `agent` is this package's submodule); `kiln.agent` is the alias.
from agentkiln.runner.identity import agent as agent_scope
from agentkiln.runner.identity import current_agent
from agentkiln.runner.loop_guard import LoopGuard
from agentkiln.runner.runner import Runner
from agentkiln.runner.sidecar import CommandAgent
from agentkiln.runner.tools import tool
from agentkiln.runner.worker import RolloutWorker, WorkerConfig

__all__ = [
    "Agent",
    "CommandAgent",
    "LLMError",
    "LLMHandle",
    "LoopDetected",
    "LoopGuard",
    "ParseError",
    "RolloutWorker",
    "Runner",
    "ToolError",
    "ToolTimeout",
    "WorkerConfig",
    "agent_scope",
    "classify",
    "current_agent",
    "emit_exception",
    "emit_message",
    "emit_object",
    "emit_reward",
    "emit_span",
    "import_agent",
    "rollout",
    "tool",
]
