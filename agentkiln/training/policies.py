"""Which learners one training run trains, where their files go, and how their weights are published.

Default: one policy, the main weights, trained on the calls `agent_match` selects (files directly
under the run folder, as always). Per-agent mode (`GRPO(agents=...)`): one policy per agent of a
multi-agent program, each with its own LoRA, optimizer and checkpoint, trained only on that
agent's LLM calls. One resources version carries every agent's adapter as an LLM endpoint with
`agent` set; the server's engine serves each adapter to that agent's calls, and agents not listed
keep the main (base) weights, i.e. stay frozen.

Layout of a per-agent run: `agents/<name>/checkpoint`, `agents/<name>/adapters/step-<k>`, and
`best/<name>`: the adapters of the step with the best validation reward (validation scores the
whole program, so the best is chosen for all agents together).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentkiln.models import LLMEndpoint
from agentkiln.protocol import AGENT_NAME_PATTERN

CHECKPOINT_DIR = "checkpoint"
BEST_DIR = "best"
ADAPTERS_DIR = "adapters"
AGENTS_DIR = "agents"
MAIN_LLM = "main"

# Agent names (each trained on exactly its own calls), or agent name -> regex over recorded agent names.
AgentSpec = Sequence[str] | Mapping[str, str]


@dataclass
class Policy:
    """One learner and its files; `agent` None means the main weights."""

    agent: str | None
    match: str | None  # regex selecting the LLM calls it learns from (None: every call)
    checkpoint: Path
    adapters: Path
    best: Path
    learner: Any = None
    adapter: str | None = None  # the weights most recently published for it
    best_adapter: str | None = None

    @property
    def label(self) -> str:
        return self.agent or MAIN_LLM

    def adapter_dir(self, step: int, unit: str = "step") -> Path:
        return self.adapters / f"{unit}-{step}"

    def has_checkpoint(self) -> bool:
        return (self.checkpoint / "trainer_state.pt").exists()


def agent_patterns(agents: AgentSpec) -> dict[str, str]:
    """Agent name -> regex; a plain list means each name matches only itself. Raises on bad input."""
    if isinstance(agents, str):
        raise TypeError("agents must be a list of names or a name -> regex mapping, not one string")
    patterns = dict(agents) if isinstance(agents, Mapping) else {name: f"^{re.escape(name)}$" for name in agents}
    if not patterns:
        raise ValueError("agents must name at least one agent")
    for name, pattern in patterns.items():
        if not isinstance(name, str) or re.fullmatch(AGENT_NAME_PATTERN, name) is None:
            raise ValueError(f"agent name must be 1-128 characters of A-Z a-z 0-9 _ . -, got {name!r}")
        if name == MAIN_LLM:
            raise ValueError(f"{MAIN_LLM!r} names the shared endpoint; give that agent another name")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"agent {name!r}: bad regex {pattern!r}: {exc}") from None
    return patterns


def plan_policies(run_dir: Path, agents: AgentSpec | None, agent_match: str | None) -> list[Policy]:
    if agents is None:
        return [Policy(None, agent_match, run_dir / CHECKPOINT_DIR, run_dir / ADAPTERS_DIR, run_dir / BEST_DIR)]
    if agent_match is not None:
        raise ValueError("give either agent_match (one shared model) or agents (one adapter per agent), not both")
    return [
        Policy(
            name,
            pattern,
            run_dir / AGENTS_DIR / name / CHECKPOINT_DIR,
            run_dir / AGENTS_DIR / name / ADAPTERS_DIR,
            run_dir / BEST_DIR / name,
        )
        for name, pattern in agent_patterns(agents).items()
    ]


def published_llms(
    model: str, sampling: dict[str, Any], policies: Sequence[Policy], adapters: Sequence[str | None]
) -> dict[str, LLMEndpoint]:
    """The `llms` of a resources version serving `adapters[i]` for `policies[i]` (None: base weights)."""
    main = next((a for p, a in zip(policies, adapters) if p.agent is None), None)
    llms = {MAIN_LLM: LLMEndpoint(model=model, sampling=dict(sampling), adapter_path=main)}
    for policy, adapter in zip(policies, adapters):
        if policy.agent is not None:
            llms[policy.agent] = LLMEndpoint(
                model=model, sampling=dict(sampling), adapter_path=adapter, agent=policy.agent
            )
    return llms
