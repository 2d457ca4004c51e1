"""Keeps the embedded engine serving the weights named by the latest published resources.

The trainer never talks to the engine: it publishes a resources version whose main LLM
names an adapter folder, and this watcher (running inside the server) swaps it in.
That keeps the store the only state the two sides share.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional

from fastapi import APIRouter, Request

from agentkiln.models import Resources
from agentkiln.store.base import Store

log = logging.getLogger(__name__)


def main_llm_weights(resources: Resources) -> Optional[str]:
    llm = resources.llms.get("main") or next(iter(resources.llms.values()), None)
    return llm.adapter_path if llm is not None else None


class ModelSync:
    """Polls the store for new resources and loads their weights into the engine once each."""

    def __init__(self, store: Store, engine: Any, interval_s: float = 0.25) -> None:
        self.store = store
        self.engine = engine
        self.interval_s = interval_s
        self.loaded_resources_id: Optional[str] = None
        self.loaded_path: Optional[str] = None
        self.last_error: Optional[str] = None

    async def sync_once(self) -> bool:
        """Load the latest resources' weights if they changed; True when something was loaded."""
        latest = await self.store.get_latest_resources()
        if latest is None or latest.resources_id == self.loaded_resources_id:
            return False
        path = main_llm_weights(latest)
        changed = path != self.loaded_path
        if changed:
            # No weights named after some were loaded: go back to the engine's original model.
            target = path if path is not None else str(getattr(self.engine, "model_dir", ""))
            version = f"v{latest.version}"
            if target:
                log.info("loading weights %s as model version %s", target, version)
                await self.engine.load_weights(target, version)
            self.loaded_path = path
        self.loaded_resources_id = latest.resources_id
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


def build_engine_status_router() -> APIRouter:
    router = APIRouter()

    @router.get("/api/v1/engine")
    async def engine_status(request: Request) -> dict[str, Any]:
        """Which weights the gateway serves now (trainers wait on this after publishing)."""
        engine = request.app.state.engine
        sync: Optional[ModelSync] = getattr(request.app.state, "model_sync", None)
        return {
            "engine": type(engine).__name__ if engine is not None else None,
            "model": getattr(engine, "model_name", None),
            "model_version": engine.model_version if engine is not None else None,
            "loaded_resources_id": sync.loaded_resources_id if sync else None,
            "last_error": sync.last_error if sync else None,
        }

    return router
