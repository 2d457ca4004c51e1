"""The weight sets an engine serves: the main model plus optionally one per agent.

Per-agent weights are a LoRA adapter merged into their own copy of the base (~0.3 GB per set for
SmolLM2-135M in bf16), so decoding an agent's batch costs no more than decoding with one model.
A request whose agent has a set is served by it, any other by the main weights. Mutated only on
the scheduler thread, between batches, so no sequence mixes two model versions.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from agentkiln.engine.embedded.prefix_cache import Scope
from agentkiln.engine.model_files import load_model
from agentkiln.engine.weight_roots import WeightsRefused, check_format
from agentkiln.production.assignment import weight_set_key

log = logging.getLogger(__name__)


@dataclass
class WeightSet:
    """One served weight set (the main model, or one agent's)."""

    model: torch.nn.Module
    version: str


class WeightSets:
    """Scope None: the main weights; a name: that agent's own."""

    def __init__(self, base: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype = dtype
        self.device = device
        self.base = base  # what adapters are merged into
        self.sets: dict[Scope, WeightSet] = {None: WeightSet(base, "base")}

    @property
    def main(self) -> WeightSet:
        return self.sets[None]

    def scope_for(self, agent: str | None) -> Scope:
        return agent if agent in self.sets else None

    def key_for(self, agent: str | None, variant: str | None) -> str | None:
        """The set serving `agent` (for a canary candidate: its own set, else the candidate's main one)."""
        return weight_set_key(agent, variant, self.sets)

    def version_for(self, agent: str | None) -> str:
        return (self.sets.get(agent) or self.sets[None]).version

    @property
    def agent_versions(self) -> dict[str, str]:
        return {name: w.version for name, w in list(self.sets.items()) if name is not None}

    def swap(self, path: Path, version: str, agent: str | None) -> None:
        """Merge a peft LoRA adapter into a copy of the base, or load a full checkpoint, for `agent`.

        Local safetensors folders only (WeightsRefused otherwise): whoever calls this, nothing is
        fetched from the hub and nothing is unpickled. Which folders are allowed at all is the
        caller's check (weight_roots.WeightsPolicy, applied by ModelSync).
        """
        who = f"agent {agent!r}" if agent is not None else "the main weights"
        if not path.is_dir():
            raise WeightsRefused(f"weights {str(path)!r} are not a local folder")
        check_format(path)
        if (path / "adapter_config.json").is_file():
            from peft import PeftModel

            log.info("merging LoRA adapter %s into a copy of the base model for %s (version %s)", path, who, version)
            peft_model = PeftModel.from_pretrained(copy.deepcopy(self.base), str(path), local_files_only=True)
            model = peft_model.merge_and_unload()
        else:
            log.info("loading full weights from %s for %s (version %s)", path, who, version)
            model = load_model(path, self.dtype).to(self.device)
            if agent is None:
                self.base = model  # main full weights become the base later adapters are merged into
        model.eval()
        self.sets[agent] = WeightSet(model, version)

    def unload(self, agent: str) -> bool:
        """Drop `agent`'s set; True when it had one."""
        if self.sets.pop(agent, None) is None:
            return False
        log.info("agent %r is served the main weights again", agent)
        return True
