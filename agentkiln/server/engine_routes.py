"""`GET /api/v1/engine`: which weights the gateway serves now (trainers wait on it after publishing)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Request

from agentkiln.engine.weight_roots import describe
from agentkiln.engine.weight_sync import ModelSync, weights_refusals
from agentkiln.models import ResourcesIn
from agentkiln.protocol import ENGINE_STATUS_PATH
from agentkiln.store.base import ValidationError


def check_publishable(app: FastAPI, resources: ResourcesIn) -> None:
    """422 for a publish whose weights this server's engine would refuse to load (see weight_roots).

    Only where an engine serves the published weights; the load-time check stays (a folder may
    change after publishing, and a store may be written without going through this route).
    """
    if getattr(app.state, "engine", None) is None:
        return
    refused = weights_refusals(app.state.weights_policy, resources)
    if refused:
        raise ValidationError(f"weights refused: {describe(refused)}")


def build_engine_status_router() -> APIRouter:
    router = APIRouter()

    @router.get(ENGINE_STATUS_PATH)
    async def engine_status(request: Request) -> dict[str, Any]:
        """Which weights the gateway serves now (trainers wait on this after publishing).

        `agent_versions` lists the agents served their own weights; every other agent gets `model_version`.
        `weights_error` (main weights) and `agent_weights_errors` (per agent) say why the latest
        published version was refused (outside the weights roots, not safetensors, over the cap).
        """
        engine = request.app.state.engine
        sync: ModelSync | None = getattr(request.app.state, "model_sync", None)
        return {
            "engine": type(engine).__name__ if engine is not None else None,
            "model": getattr(engine, "model_name", None),
            "model_version": engine.model_version if engine is not None else None,
            "agent_versions": dict(getattr(engine, "agent_versions", None) or {}),
            "loaded_resources_id": sync.loaded_resources_id if sync else None,
            "loaded_agents": dict(sync.loaded_agents) if sync else {},
            "last_error": sync.last_error if sync else None,
            # The latest version's refused weights (nothing of it was loaded; the previous weights serve).
            "refused_resources_id": sync.refused_resources_id if sync else None,
            "weights_error": sync.weights_error if sync else None,
            "agent_weights_errors": dict(sync.agent_weights_errors) if sync else {},
            # The canary whose candidate weights are loaded and routed to (None: every session gets the deployed).
            "canary_id": sync.serving_canary.canary_id if sync and sync.serving_canary else None,
            "canary_error": sync.canary_error if sync else None,
            # Engine-specific state (a vLLM engine: its server process, restarts, the LoRA names served).
            "server": engine.status() if engine is not None and hasattr(engine, "status") else None,
        }

    return router
