"""`GET /v1/models`: the one model the attached engine serves (none without an engine)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from agentkiln.gateway.call import Serving
from agentkiln.gateway.incoming import path_agent


class ModelsServing(Serving):
    async def __call__(self, request: Request) -> Response:
        path_agent(request)  # the per-agent twin rejects a bad name like the other routes
        engine = self.deps.get_engine(request)
        data = []
        if engine is not None:
            try:
                version = engine.model_version
            except Exception:  # listing models must not fail on an engine mid-swap
                version = None
            data.append(
                {"id": engine.model_name, "object": "model", "created": 0, "owned_by": "agentkiln", "version": version}
            )
        return JSONResponse({"object": "list", "data": data})
