"""The dashboard `kiln serve` shows at `/`: page shells, their static assets, and the JSON they read.

The pages hold no data: they are public (so a browser can open them without a header) and
their scripts read everything from `/api/v1/dashboard/...` and `/api/v1/engine` with the
same credentials as any API client (a key typed into the login form is kept in
sessionStorage and sent as a Bearer header; on loopback without a key none is needed). The
dashboard API is admin-only (server/auth.py route policy), like the store's own rollout queries.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from agentkiln.dashboard import queries, resources_view, rollout_view, runs
from agentkiln.protocol import API_PREFIX
from agentkiln.store.base import NotFoundError

HERE = Path(__file__).parent
STATIC_PREFIX = "/dashboard/static/"
DASHBOARD_API = API_PREFIX + "/dashboard"
# path -> (template, title, nav label)
PAGES = {
    "/": ("overview.html", "Overview"),
    "/runs": ("runs.html", "Training runs"),
    "/rollouts": ("rollouts.html", "Rollouts"),
    "/rollout": ("rollout.html", "Rollout"),
    "/resources": ("resources.html", "Resources"),
}
NAV = [("/", "Overview"), ("/runs", "Training runs"), ("/rollouts", "Rollouts"), ("/resources", "Resources")]
_TYPES = {".js": "text/javascript", ".css": "text/css", ".txt": "text/plain", ".LICENSE": "text/plain"}
STATIC_FILES = {p.name: p for p in (HERE / "static").iterdir() if p.is_file()}
# What AuthMiddleware lets through without a credential: the empty page shells and their assets.
PUBLIC_PATHS = (*PAGES, *(STATIC_PREFIX + name for name in STATIC_FILES))


@functools.cache
def _templates() -> Any:
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    return Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))


def build_dashboard_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    def page(template: str, title: str) -> Any:
        async def render(request: Request) -> HTMLResponse:
            html = (
                _templates()
                .get_template(template)
                .render(title=title, nav=NAV, path=request.url.path, static=STATIC_PREFIX)
            )
            return HTMLResponse(html, headers={"cache-control": "no-store"})

        return render

    for path, (template, title) in PAGES.items():
        router.add_api_route(path, page(template, title), methods=["GET"], response_class=HTMLResponse)

    @router.get(STATIC_PREFIX + "{name}")
    async def static(name: str) -> Response:
        path = STATIC_FILES.get(name)
        if path is None:
            raise NotFoundError(f"no dashboard asset {name!r}")
        media = _TYPES.get(path.suffix, "application/octet-stream")
        return Response(path.read_bytes(), media_type=media, headers={"cache-control": "no-cache"})

    @router.get(DASHBOARD_API + "/overview")
    async def overview(request: Request) -> dict[str, Any]:
        store = request.app.state.store
        summary = await queries.store_summary(store)
        workers = await store.query_workers()
        return {"summary": summary.model_dump(), "workers": [w.model_dump(mode="json") for w in workers]}

    @router.get(DASHBOARD_API + "/rollouts")
    async def rollouts(request: Request, f: Annotated[queries.RolloutFilter, Query()]) -> queries.RolloutPage:
        return await queries.rollout_page(request.app.state.store, f)

    @router.get(DASHBOARD_API + "/rollouts/{rollout_id}")
    async def rollout(request: Request, rollout_id: str) -> dict[str, Any]:
        return await rollout_view.rollout_detail(request.app.state.store, rollout_id, request.app.state.engine)

    @router.get(DASHBOARD_API + "/runs")
    async def list_runs(request: Request) -> dict[str, Any]:
        found = runs.discover(getattr(request.app.state, "run_dirs", ()))
        return {"runs": runs.run_summaries(found)}

    @router.get(DASHBOARD_API + "/runs/{key}")
    async def one_run(request: Request, key: str) -> dict[str, Any]:
        folder = runs.find(runs.discover(getattr(request.app.state, "run_dirs", ())), key)
        if folder is None:
            raise NotFoundError(f"no training run {key!r} (runs are folders holding {runs.HISTORY_FILE})")
        info = runs.run_info(key, folder)
        info["rollout_rewards"] = await runs.rollout_rewards(request.app.state.store)
        return info

    @router.get(DASHBOARD_API + "/resources")
    async def resources(request: Request) -> dict[str, Any]:
        return {"versions": await resources_view.resources_versions(request.app.state.store)}

    return router
