"""The canary routes (promote, rollback, stats) on the real server app, and `kiln canary` against it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request
from typer.testing import CliRunner

from agentkiln.models import Canary, CanaryIn, CanaryStatus
from agentkiln.protocol import CANARIES_PATH
from agentkiln.server.app import create_app
from agentkiln.server.serve import ServerThread
from tests.canary_fakes import canary_store, publish, rate_sessions, versions

ADMIN, RUNNER = "admin-key", "runner-key"


def _stand_in_store_routes(app: FastAPI) -> None:
    """The canary store routes (canary_store_routes.py), for as long as the app does not have them."""
    if any(getattr(r, "path", None) == CANARIES_PATH and "POST" in getattr(r, "methods", ()) for r in app.routes):
        return
    router = APIRouter(prefix=CANARIES_PATH)

    @router.post("", status_code=201, response_model=Canary)
    async def start(request: Request, body: CanaryIn) -> Canary:
        return await request.app.state.store.start_canary(body)

    @router.get("/active", response_model=Canary | None)
    async def active(request: Request) -> Any:
        return await request.app.state.store.get_active_canary()

    @router.get("/{canary_id}", response_model=Canary)
    async def get(request: Request, canary_id: str) -> Canary:
        return await request.app.state.store.get_canary(canary_id)

    app.include_router(router)


class Server:
    """The real app on a loopback port, around a store the test also writes to directly."""

    def __init__(self) -> None:
        self.store = canary_store()
        self.app = create_app(self.store, api_key=ADMIN, runner_key=RUNNER, sweep_interval_s=0, canary_interval_s=0)
        _stand_in_store_routes(self.app)
        self.thread = ServerThread(self.app)
        self.url = self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run(coro)

    def stop(self) -> None:
        self.thread.stop()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    try:
        yield s
    finally:
        s.stop()


def admin(method: str, server: Server, path: str, key: str = ADMIN, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, server.url + CANARIES_PATH + path, headers={"Authorization": f"Bearer {key}"},
                         timeout=30, **kwargs)  # fmt: skip


def started(server: Server, **fields: Any) -> tuple[Any, Any, dict[str, Any]]:
    base, cand = server.run(versions(server.store))
    resp = admin("POST", server, "", json={"candidate_resources_id": cand.resources_id, "share": 0.5, **fields})
    assert resp.status_code == 201, resp.text
    return base, cand, resp.json()


def test_promote_route_publishes_and_ends_the_canary(server: Server) -> None:
    base, _, canary = started(server)
    server.run(rate_sessions(server.store, "b", f"v{base.version}", [True, False, True]))
    stats = admin("GET", server, f"/{canary['canary_id']}/stats")
    assert stats.status_code == 200
    assert stats.json()["baseline"]["n"] == 3 and stats.json()["candidate"]["n"] == 0
    resp = admin("POST", server, f"/{canary['canary_id']}/promote", json={"reason": "looks good"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "promoted" and body["decisions"][-1] == {
        **body["decisions"][-1],
        "by": "user",
        "reason": "looks good",
        "action": "promote",
    }
    assert body["decisions"][-1]["stats"]["baseline"]["n"] == 3
    latest = server.run(server.store.get_latest_resources())
    assert latest.resources_id == body["promoted_resources_id"] and latest.metadata["canary_id"] == canary["canary_id"]
    again = admin("POST", server, f"/{canary['canary_id']}/rollback", json={"reason": "too late"})
    assert again.status_code == 409 and "already promoted" in again.json()["error"]["message"]


def test_rollback_route_and_errors(server: Server) -> None:
    base, _, canary = started(server)
    cid = canary["canary_id"]
    assert admin("POST", server, "/can-nope/promote", json={}).status_code == 404
    assert admin("GET", server, "/can-nope/stats").status_code == 404
    assert admin("POST", server, f"/{cid}/promote", json={"reason": 3}).status_code == 422
    assert admin("POST", server, f"/{cid}/promote", json={"why": "x"}).status_code == 422  # unknown field
    for method, path in (("POST", f"/{cid}/promote"), ("POST", f"/{cid}/rollback"), ("GET", f"/{cid}/stats")):
        assert admin(method, server, path, key=RUNNER, json={}).status_code == 403
    resp = admin("POST", server, f"/{cid}/rollback")  # no body: reason ""
    assert resp.status_code == 200 and resp.json()["status"] == "rolled_back"
    assert server.run(server.store.get_latest_resources()).resources_id == base.resources_id
    assert admin("POST", server, f"/{cid}/promote", json={}).status_code == 409


def test_promote_route_refuses_a_deployed_candidate(server: Server) -> None:
    base = server.run(publish(server.store, "base"))
    other = server.run(publish(server.store, "other"))
    canary = server.run(server.store.start_canary(CanaryIn(candidate_resources_id=other.resources_id,
                                                           baseline_resources_id=base.resources_id)))  # fmt: skip
    resp = admin("POST", server, f"/{canary.canary_id}/promote", json={})
    assert resp.status_code == 422 and "not a candidate" in resp.json()["error"]["message"]


# --------------------------------------------------------------------------- kiln canary


def kiln(server: Server, *args: str) -> Any:
    import agentkiln.cli.canary  # noqa: F401  (registers the commands)
    from agentkiln.cli.app import app

    return CliRunner().invoke(app, ["canary", *args, "--server", server.url, "--api-key", ADMIN])


def test_cli_start_status_promote(server: Server) -> None:
    base, cand = server.run(versions(server.store))
    res = kiln(server, "start", "--candidate", cand.resources_id, "--share", "0.3", "--min-samples", "5",
               "--max-regression", "0.1", "--manual", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    made = json.loads(res.stdout)
    assert made["share"] == 0.3 and made["baseline_resources_id"] == base.resources_id
    assert made["rule"] == {**made["rule"], "min_samples": 5, "max_regression": 0.1, "auto": False, "metric": "user"}
    server.run(rate_sessions(server.store, "c", f"v{cand.version}", [True, True, False]))

    res = kiln(server, "status", "--json")  # the active canary by default
    assert res.exit_code == 0, res.output
    shown = json.loads(res.stdout)
    assert shown["canary"]["canary_id"] == made["canary_id"] and shown["stats"]["candidate"]["n"] == 3
    res = kiln(server, "status", made["canary_id"])
    assert res.exit_code == 0, res.output
    assert made["canary_id"] in res.stdout and "candidate v2" in res.stdout and "start" in res.stdout

    res = kiln(server, "promote", "--reason", "by hand")
    assert res.exit_code == 0, res.output
    stored = server.run(server.store.get_canary(made["canary_id"]))
    assert stored.status == CanaryStatus.promoted and stored.decisions[-1].reason == "by hand"
    assert "deployed as res-" in res.stdout
    res = kiln(server, "status", made["canary_id"])
    assert res.exit_code == 0 and "promoted: deployed as res-" in res.stdout and "by hand" in res.stdout

    res = kiln(server, "rollback", made["canary_id"])
    assert res.exit_code == 1 and "409" in res.output and "already promoted" in res.output
    res = kiln(server, "promote")
    assert res.exit_code == 1 and "no active canary" in res.output


def test_cli_rollback_and_bad_options(server: Server) -> None:
    _, cand = server.run(versions(server.store))
    res = kiln(server, "start", "--candidate", cand.resources_id, "--confidence", "1.5")
    assert res.exit_code != 0 and "confidence" in res.output
    res = kiln(server, "start", "--candidate", "res-missing")
    assert res.exit_code == 1 and "404" in res.output
    res = kiln(server, "start", "--candidate", cand.resources_id)
    assert res.exit_code == 0 and "20% of sessions" in res.stdout
    res = kiln(server, "rollback", "--reason", "not now", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["status"] == "rolled_back"
    res = CliRunner().invoke(__import__("agentkiln.cli.app", fromlist=["app"]).app,
                             ["canary", "status", "--server", server.url, "--api-key", "wrong"])  # fmt: skip
    assert res.exit_code == 1 and "401" in res.output


def test_the_server_runs_the_controller() -> None:
    """create_app starts a CanaryController (canary_interval_s > 0) that decides by the rule; 0 turns it off."""
    import time

    store = canary_store()
    base, cand = asyncio.run(versions(store))
    canary = asyncio.run(store.start_canary(CanaryIn(candidate_resources_id=cand.resources_id,
                                                     rule={"min_samples": 5})))  # fmt: skip
    asyncio.run(rate_sessions(store, "b", f"v{base.version}", [True] * 5))
    asyncio.run(rate_sessions(store, "c", f"v{cand.version}", [False] * 5))
    off = create_app(store, sweep_interval_s=0, canary_interval_s=0)
    with ServerThread(off):
        time.sleep(0.3)
        assert off.state.canary_controller is None
    assert asyncio.run(store.get_canary(canary.canary_id)).status == CanaryStatus.active
    app = create_app(store, sweep_interval_s=0, canary_interval_s=0.05)
    _stand_in_store_routes(app)
    with ServerThread(app) as served:  # read through the server: its loop alone touches the store meanwhile
        deadline = time.monotonic() + 10
        while httpx.get(f"{served.url}{CANARIES_PATH}/{canary.canary_id}").json()["status"] == "active":
            assert time.monotonic() < deadline, "the controller did not decide"
            time.sleep(0.05)
        assert app.state.canary_controller.last_stats.candidate.n == 5
    assert asyncio.run(store.get_canary(canary.canary_id)).status == CanaryStatus.rolled_back
