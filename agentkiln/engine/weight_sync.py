"""Keeps an engine serving the weights named by the latest published resources.

The trainer never talks to the engine: it publishes a resources version whose main LLM
names an adapter folder (and, for per-agent training, endpoints with `agent` set naming each
agent's adapter), and this watcher (running inside the server) swaps them in.
That keeps the store the only state the two sides share.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

from agentkiln.engine.base import Engine
from agentkiln.models import Resources
from agentkiln.store.base import Store

log = logging.getLogger(__name__)


def main_llm_weights(resources: Resources) -> Optional[str]:
    llm = resources.main_llm()
    return llm.adapter_path if llm is not None else None


def agent_weights(resources: Resources) -> dict[str, str]:
    """Agent name -> the weights published for that agent alone (agents left out get the main weights)."""
    return {agent: llm.adapter_path for agent, llm in resources.agent_llms().items() if llm.adapter_path}


def agent_version(agent: str, resources_version: int) -> str:
    """The model version recorded on spans of `agent`'s calls served by its own weights."""
    return f"{agent}@v{resources_version}"


class ModelSync:
    """Polls the store for new resources and loads their weights into the engine once each.

    Each weight set (the main one and every agent's) is reloaded only when its path changes, so
    a version that retrains one agent leaves the others' weights and versions as they were.
    """

    def __init__(self, store: Store, engine: Engine, interval_s: float = 0.25) -> None:
        self.store = store
        self.engine = engine
        self.interval_s = interval_s
        self.loaded_resources_id: Optional[str] = None
        self.loaded_path: Optional[str] = None
        self.loaded_agents: dict[str, str] = {}  # agent -> path of its own weights now served
        self.last_error: Optional[str] = None

    async def sync_once(self) -> bool:
        """Load the latest resources' weights if they changed; True when something was loaded."""
        latest = await self.store.get_latest_resources()
        if latest is None or latest.resources_id == self.loaded_resources_id:
            return False
        changed = await self._sync_main(latest)
        changed = await self._sync_agents(latest) or changed
        self.loaded_resources_id = latest.resources_id
        return changed

    async def _sync_main(self, latest: Resources) -> bool:
        path = main_llm_weights(latest)
        if path == self.loaded_path:
            return False
        # No weights named after some were loaded: go back to the engine's original model.
        target = path if path is not None else str(getattr(self.engine, "model_dir", ""))
        version = f"v{latest.version}"
        if target:
            log.info("loading weights %s as model version %s", target, version)
            await self.engine.load_weights(target, version)
        self.loaded_path = path
        return True

    async def _sync_agents(self, latest: Resources) -> bool:
        wanted = agent_weights(latest)
        changed = False
        for agent in [a for a in self.loaded_agents if a not in wanted]:
            log.info("agent %r no longer has its own weights; serving it the main weights", agent)
            await self.engine.unload_weights(agent)
            del self.loaded_agents[agent]
            changed = True
        for agent, path in wanted.items():
            if self.loaded_agents.get(agent) == path:
                continue
            version = agent_version(agent, latest.version)
            log.info("loading weights %s for agent %r as model version %s", path, agent, version)
            await self.engine.load_weights(path, version, agent=agent)
            self.loaded_agents[agent] = path
            changed = True
        return changed

    async def run_forever(self) -> None:
        while True:
            try:
                await self.sync_once()
                self.last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bad adapter must not stop serving the previous weights
                if str(exc) != self.last_error:
                    log.exception("could not load published weights")
                self.last_error = str(exc)
            await asyncio.sleep(self.interval_s)
