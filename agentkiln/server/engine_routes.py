"""`GET /api/v1/engine`: which weights the gateway serves now (trainers wait on it after publishing)."""

from __future__ import annotations

from typing import Any, Optional

from fastapi import APIRouter, Request

from agentkiln.engine.weight_sync import ModelSync
from agentkiln.protocol import ENGINE_STATUS_PATH


def build_engine_status_router() -> APIRouter:
    router = APIRouter()

    @router.get(ENGINE_STATUS_PATH)
    async def engine_status(request: Request) -> dict[str, Any]:
        """Which weights the gateway serves now (trainers wait on this after publishing).

        `agent_versions` lists the agents served their own weights; every other agent gets `model_version`.
        """
        engine = request.app.state.engine
        sync: Optional[ModelSync] = getattr(request.app.state, "model_sync", None)
        return {
            "engine": type(engine).__name__ if engine is not None else None,
            "model": getattr(engine, "model_name", None),
            "model_version": engine.model_version if engine is not None else None,
            "agent_versions": dict(getattr(engine, "agent_versions", None) or {}),
            "loaded_resources_id": sync.loaded_resources_id if sync else None,
            "loaded_agents": dict(sync.loaded_agents) if sync else {},
            "last_error": sync.last_error if sync else None,
        }

    return router
