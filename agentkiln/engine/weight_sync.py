"""Keeps an engine serving the weights named by the latest published resources.

The trainer never talks to the engine: it publishes a resources version whose main LLM
names an adapter folder (and, for per-agent training, endpoints with `agent` set naming each
agent's adapter), and this watcher (running inside the server) swaps them in.
That keeps the store the only state the two sides share.

Every path is checked against the server's WeightsPolicy (allowed roots, safetensors only, a cap
on per-agent sets) before anything of a version is loaded: a version with any refused weight set
is refused whole, so what is served always comes from one published version, and the previous
weights keep serving. The refusal is logged once and reported by the engine status route.
"""

from __future__ import annotations

import asyncio
import logging

from agentkiln.engine.base import Engine
from agentkiln.engine.weight_roots import WeightsPolicy, describe
from agentkiln.models import Canary, Resources
from agentkiln.production.assignment import candidate_key
from agentkiln.store.base import Store

log = logging.getLogger(__name__)


def main_llm_weights(resources: Resources) -> str | None:
    llm = resources.main_llm()
    return llm.adapter_path if llm is not None else None


def agent_weights(resources: Resources) -> dict[str, str]:
    """Agent name -> the weights published for that agent alone (agents left out get the main weights)."""
    return {agent: llm.adapter_path for agent, llm in resources.agent_llms().items() if llm.adapter_path}


def agent_version(agent: str, resources_version: int) -> str:
    """The model version recorded on spans of `agent`'s calls served by its own weights."""
    return f"{agent}@v{resources_version}"


def weights_refusals(policy: WeightsPolicy, resources: Resources) -> dict[str | None, str]:
    """Why `resources`' weight sets may not be loaded (key None: the main weights); empty: all may."""
    return policy.refusals(main_llm_weights(resources), agent_weights(resources))


class ModelSync:
    """Polls the store for new resources and loads their weights into the engine once each.

    Each weight set (the main one and every agent's) is reloaded only when its path changes, so
    a version that retrains one agent leaves the others' weights and versions as they were.
    `loaded_resources_id` names the latest version served in full; a refused version never
    becomes it (trainers waiting on it see `last_error` instead).
    """

    def __init__(
        self, store: Store, engine: Engine, interval_s: float = 0.25, policy: WeightsPolicy | None = None
    ) -> None:
        self.store = store
        self.engine = engine
        self.interval_s = interval_s
        self.policy = policy if policy is not None else WeightsPolicy.build()
        self.loaded_resources_id: str | None = None
        self.loaded_path: str | None = None
        self.loaded_agents: dict[str, str] = {}  # agent -> path of its own weights now served
        self.load_error: str | None = None  # the last load that raised (retried every poll)
        self.checked_resources_id: str | None = None  # the latest version looked at, loaded or refused
        self.refused_resources_id: str | None = None
        self.weights_error: str | None = None  # why the latest version's main weights were refused
        self.agent_weights_errors: dict[str, str] = {}  # agent -> why its weights in that version were refused
        # Canary: the active canary whose candidate weights are loaded (the gateway routes its share there).
        self.serving_canary: Canary | None = None
        self.candidate_versions: frozenset[str] = frozenset()  # the version labels its weights answer with
        self._candidate_loaded: tuple[str, tuple[str, ...]] | None = None  # (resources id, engine keys)
        self.canary_error: str | None = None

    @property
    def last_error(self) -> str | None:
        """Why the latest version is not served: a refusal, or a load that failed."""
        if self.refused_resources_id is not None:
            refused = {None: self.weights_error} if self.weights_error else {}
            return f"weights of {self.refused_resources_id} refused: " + describe(
                {**refused, **self.agent_weights_errors}
            )
        return self.load_error

    async def sync_once(self) -> bool:
        """Load the latest resources' weights if they changed; True when something was loaded."""
        latest = await self.store.get_latest_resources()
        if latest is None or latest.resources_id in (self.loaded_resources_id, self.checked_resources_id):
            return False
        if self._refuse(latest):
            return False
        changed = await self._sync_main(latest)
        changed = await self._sync_agents(latest) or changed
        self.loaded_resources_id = self.checked_resources_id = latest.resources_id
        return changed

    def _refuse(self, latest: Resources) -> bool:
        """Check every path `latest` makes us load first; on any refusal record it, log it once, load nothing."""
        main, agents = main_llm_weights(latest), agent_weights(latest)
        refused = self.policy.refusals(
            main if main != self.loaded_path else None,
            {agent: path for agent, path in agents.items() if self.loaded_agents.get(agent) != path},
            n_agents=len(agents),
        )
        self.weights_error = refused.pop(None, None)
        self.agent_weights_errors = {str(agent): why for agent, why in refused.items()}
        self.refused_resources_id = latest.resources_id if (refused or self.weights_error) else None
        if self.refused_resources_id is None:
            return False
        self.checked_resources_id = latest.resources_id
        log.error("%s; still serving the previous weights", self.last_error)
        return True

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

    async def sync_canary(self) -> None:
        """Load the active canary's candidate weights under candidate keys; drop them when it ends.

        Until they are loaded `serving_canary` stays None, so no call is routed to weights that are
        not there; a refused or failing candidate is reported in `canary_error` and never served.
        """
        canary = await self.store.get_active_canary()
        wanted = canary.candidate_resources_id if canary is not None else None
        loaded = self._candidate_loaded
        if loaded is not None and loaded[0] != wanted:
            self.serving_canary, self.candidate_versions = None, frozenset()
            for key in loaded[1]:
                await self.engine.unload_weights(key)
            self._candidate_loaded = None
            log.info("canary over: candidate %s unloaded", loaded[0])
        if canary is None:
            self.serving_canary = None
            return
        if self._candidate_loaded is None:
            if self.canary_error is not None and self.canary_error.startswith(wanted + ":"):
                return  # refused once; a new canary is needed
            try:
                candidate = await self.store.get_resources(wanted)
                keys = await self._load_candidate(candidate)
            except Exception as exc:  # a candidate that cannot load is never served; the baseline is
                self.canary_error = f"{wanted}: {exc}"
                log.exception("canary candidate %s could not be loaded", wanted)
                return
            if keys is None:
                return
            self._candidate_loaded = (wanted, keys)
            self.candidate_versions = frozenset(
                [f"v{candidate.version}"] + [agent_version(a, candidate.version) for a in agent_weights(candidate)]
            )
        self.serving_canary = canary

    async def _load_candidate(self, candidate: Resources) -> tuple[str, ...] | None:
        main, agents = main_llm_weights(candidate), agent_weights(candidate)
        refused = self.policy.refusals(main, agents, n_agents=len(agents))
        if refused:
            self.canary_error = f"{candidate.resources_id}: weights refused: {describe(refused)}"
            log.error("canary candidate %s", self.canary_error)
            return None
        keys = []
        if main:
            await self.engine.load_weights(main, f"v{candidate.version}", agent=candidate_key(None))
            keys.append(candidate_key(None))
        for agent, path in agents.items():
            await self.engine.load_weights(path, agent_version(agent, candidate.version), agent=candidate_key(agent))
            keys.append(candidate_key(agent))
        log.info("canary candidate %s loaded (%d weight set(s))", candidate.resources_id, len(keys))
        self.canary_error = None
        return tuple(keys)

    async def run_forever(self) -> None:
        while True:
            # The canary first: an ended canary stops routing before its promotion's weights load.
            try:
                await self.sync_canary()
            except asyncio.CancelledError:
                raise
            except NotImplementedError:  # a store without canaries
                pass
            except Exception:
                log.exception("canary sync failed")
            try:
                await self.sync_once()
                self.load_error = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bad adapter must not stop serving the previous weights
                if str(exc) != self.load_error:
                    log.exception("could not load published weights")
                self.load_error = str(exc)
            await asyncio.sleep(self.interval_s)
