"""Roles (issue 13): an admin key, a runner key, and per-attempt tokens that agents get instead of either.

Everything runs against the real app on a loopback port with both keys set.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys

import httpx
import pytest

from agentkiln.models import LLMEndpoint, ResourcesIn
from agentkiln.protocol import EnvVars, SpanAttrs, attempt_base_url
from agentkiln.runner import Runner
from agentkiln.runner.agent import Invocation, LLMHandle
from agentkiln.runner.sidecar import CommandAgent
from agentkiln.runner.worker import WorkerConfig
from agentkiln.server.app import create_app
from agentkiln.server.auth import AttemptTokens
from agentkiln.server.serve import ServerThread
from agentkiln.store import InMemoryStore
from agentkiln.store.client import HttpStore
from tests.gateway_fakes import ScriptedEngine

ADMIN_KEY, RUNNER_KEY = "admin-secret-key", "runner-secret-key"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _auth(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


@pytest.fixture
def server():
    store = InMemoryStore(sweep_interval_s=None)
    app = create_app(store, api_key=ADMIN_KEY, runner_key=RUNNER_KEY, engine=ScriptedEngine(), sweep_interval_s=0)
    with ServerThread(app) as thread:
        with httpx.Client(base_url=thread.url, timeout=10) as client:
            yield thread.url, client


def _two_attempts(client: httpx.Client) -> tuple[dict, dict]:
    """Two rollouts enqueued by the admin and dequeued by a runner: each comes with its own token."""
    for i in range(2):
        assert client.post("/api/v1/rollouts", json={"input": {"secret_answer": i}}, headers=_auth(ADMIN_KEY)).is_success
    got = [client.post("/api/v1/dequeue", json={"worker_id": "w"}, headers=_auth(RUNNER_KEY)).json() for _ in range(2)]
    assert all(g["token"] for g in got) and got[0]["token"] != got[1]["token"]
    return got[0], got[1]


def _ids(ar: dict) -> tuple[str, str]:
    return ar["rollout"]["rollout_id"], ar["attempt"]["attempt_id"]


def _span(ar: dict, name: str = "step", **attributes) -> dict:
    rid, aid = _ids(ar)
    return {"rollout_id": rid, "attempt_id": aid, "name": name, "attributes": attributes}


def test_missing_and_wrong_credentials_are_refused(server) -> None:
    _, client = server
    assert client.get("/health").status_code == 200
    assert client.get("/api/v1/rollouts").status_code == 401
    assert client.get("/api/v1/rollouts", headers=_auth("nope")).status_code == 401
    forged = AttemptTokens.for_key("another-servers-key").mint("ro-x", "at-x")
    r = client.get("/api/v1/rollouts", headers=_auth(forged))
    assert r.status_code == 401 and "invalid" in r.json()["error"]["message"]


def test_attempt_token_is_scoped_to_its_attempt(server) -> None:
    url, client = server
    mine, other = _two_attempts(client)
    token = _auth(mine["token"])
    (rid, aid), (other_rid, other_aid) = _ids(mine), _ids(other)
    forbidden = [
        ("GET", f"/api/v1/rollouts/{other_rid}", None),  # another rollout (its answer)
        ("GET", f"/api/v1/rollouts/{rid}", None),  # even its own record: the runner handed it the task
        ("GET", "/api/v1/rollouts", None),
        ("GET", f"/api/v1/rollouts/{other_rid}/spans", None),
        ("POST", "/api/v1/resources", {"prompts": {"p": {"template": "x"}}}),
        ("POST", f"/api/v1/rollouts/{other_rid}/cancel", None),
        ("POST", f"/api/v1/rollouts/{rid}/cancel", None),
        ("POST", "/api/v1/dequeue", {}),
        ("PATCH", f"/api/v1/rollouts/{rid}/attempts/{aid}", {"status": "succeeded"}),
        ("PATCH", f"/api/v1/rollouts/{rid}", {"status": "succeeded"}),
        ("POST", "/api/v1/check-timeouts", None),
        ("POST", "/api/v1/rollouts", {"input": 1}),
    ]
    for method, path, body in forbidden:
        r = client.request(method, path, json=body, headers=token)
        assert r.status_code == 403, (method, path, r.text)
    # its own spans: yes; another attempt's: no
    assert client.post("/api/v1/spans", json=[_span(mine)], headers=token).status_code == 200
    r = client.post("/api/v1/spans", json=[_span(other)], headers=token)
    assert r.status_code == 403 and "own attempt" in r.json()["error"]["message"]
    # its own gateway: yes; another attempt's: no
    own_url = attempt_base_url(url, rid, aid)
    assert httpx.post(f"{own_url}/chat/completions", json=CHAT, headers=token).status_code == 200
    other_url = attempt_base_url(url, other_rid, other_aid)
    assert httpx.post(f"{other_url}/chat/completions", json=CHAT, headers=token).status_code == 403
    # plain /v1 with the token is recorded on the token's attempt; naming another attempt in headers is refused
    assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=token).status_code == 200
    spoof = {**token, "X-Kiln-Rollout-Id": other_rid, "X-Kiln-Attempt-Id": other_aid}
    assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=spoof).status_code == 403
    spans = client.get(f"/api/v1/rollouts/{rid}/spans", headers=_auth(ADMIN_KEY)).json()
    assert sum(s["name"] == "kiln.llm.call" for s in spans) == 2
    assert client.get(f"/api/v1/rollouts/{other_rid}/spans", headers=_auth(ADMIN_KEY)).json() == []


def test_llm_call_records_come_only_from_the_gateway(server) -> None:
    _, client = server
    mine, _ = _two_attempts(client)
    forged = [
        _span(mine, "kiln.llm.call"),
        _span(mine, "step", **{SpanAttrs.response_token_ids: [1, 2, 3]}),
    ]
    for credential in (mine["token"], RUNNER_KEY):
        for span in forged:
            r = client.post("/api/v1/spans", json=[span], headers=_auth(credential))
            assert r.status_code == 403 and "gateway only" in r.json()["error"]["message"], r.text
    assert client.post("/api/v1/spans", json=forged, headers=_auth(ADMIN_KEY)).status_code == 200  # an import


def test_token_expires_with_its_attempt(server) -> None:
    url, client = server
    mine, _ = _two_attempts(client)
    rid, aid = _ids(mine)
    token = _auth(mine["token"])
    assert client.post("/api/v1/spans", json=[_span(mine)], headers=token).status_code == 200
    r = client.patch(
        f"/api/v1/rollouts/{rid}/attempts/{aid}", json={"status": "succeeded", "worker_id": "w"}, headers=_auth(RUNNER_KEY)
    )
    assert r.status_code == 200
    r = client.post("/api/v1/spans", json=[_span(mine)], headers=token)
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]
    assert httpx.post(f"{attempt_base_url(url, rid, aid)}/chat/completions", json=CHAT, headers=token).status_code == 401
    # and the runner cannot add new spans to the finished attempt either (409)
    assert client.post("/api/v1/spans", json=[_span(mine, "late")], headers=_auth(RUNNER_KEY)).status_code == 409


def test_runner_key_runs_the_loop_but_administers_nothing(server) -> None:
    _, client = server
    runner = _auth(RUNNER_KEY)
    admin_only = [
        ("POST", "/api/v1/resources", {"prompts": {"p": {"template": "x"}}}),
        ("POST", "/api/v1/rollouts", {"input": 1}),
        ("POST", "/api/v1/rollouts/batch", {"items": [{"input": 1}]}),
        ("POST", "/api/v1/check-timeouts", None),
        ("GET", "/api/v1/rollouts", None),
    ]
    for method, path, body in admin_only:
        assert client.request(method, path, json=body, headers=runner).status_code == 403, path
    mine, _ = _two_attempts(client)
    rid, _aid = _ids(mine)
    assert client.post(f"/api/v1/rollouts/{rid}/cancel", headers=runner).status_code == 403
    assert client.post("/api/v1/workers/w/heartbeat", json={}, headers=runner).status_code == 200
    assert client.get(f"/api/v1/rollouts/{rid}", headers=runner).status_code == 200
    assert client.post(f"/api/v1/rollouts/{rid}/cancel", headers=_auth(ADMIN_KEY)).status_code == 200


def test_runner_updates_only_the_attempts_it_holds(server) -> None:
    _, client = server
    mine, _ = _two_attempts(client)  # dequeued by worker "w"
    rid, aid = _ids(mine)
    path, runner = f"/api/v1/rollouts/{rid}/attempts/{aid}", _auth(RUNNER_KEY)
    for body in ({"status": "succeeded"}, {"status": "failed", "worker_id": "someone-else"}):
        r = client.patch(path, json=body, headers=runner)
        assert r.status_code == 403 and "held by worker" in r.json()["error"]["message"], r.text
    assert client.patch(path, json={"status": "succeeded", "worker_id": "w"}, headers=runner).status_code == 200


def test_no_client_clock(server) -> None:
    _, client = server
    r = client.post("/api/v1/check-timeouts", json={"now": 1e308}, headers=_auth(ADMIN_KEY))
    assert r.status_code == 422 and "now" in r.text
    assert client.post("/api/v1/check-timeouts", headers=_auth(ADMIN_KEY)).json() == []


async def test_agents_and_sidecars_get_only_their_attempt_token(server, tmp_path, monkeypatch, caplog) -> None:
    """Through the real runner: the in-process agent's OpenAI key and the sidecar's whole environment."""
    caplog.set_level(logging.DEBUG)
    url, client = server
    client.post("/api/v1/resources", json={"llms": {"main": {"model": "m"}}}, headers=_auth(ADMIN_KEY))
    seen: list[LLMHandle] = []

    async def agent(task, llm: LLMHandle):
        seen.append(llm)
        return 1.0

    monkeypatch.setenv("KILN_API_KEY", ADMIN_KEY)  # what a careless runner host has in its environment
    monkeypatch.setenv("SOME_CLOUD_SECRET", "s3cr3t")
    monkeypatch.setenv("WANTED_BY_AGENT", "yes")
    dump = tmp_path / "env.json"
    script = f"import json, os; json.dump(dict(os.environ), open({str(dump)!r}, 'w'))"
    sidecar = CommandAgent([sys.executable, "-c", script], pass_env=["WANTED_BY_AGENT"])
    cfg = WorkerConfig(poll_interval_s=0.02, heartbeat_s=0.2, gateway_url=url, api_key=RUNNER_KEY)
    for one in (agent, sidecar):
        assert client.post("/api/v1/rollouts", json={"input": "t"}, headers=_auth(ADMIN_KEY)).is_success
        async with HttpStore(url, api_key=RUNNER_KEY) as store:
            await Runner(one, store, mode="thread", n_workers=1, until_empty=True, config=cfg).arun()
    (llm,) = seen
    assert llm.api_key.startswith("kat_") and llm.api_key not in repr(llm)
    assert not next(f for f in dataclasses.fields(Invocation) if f.name == "api_key").repr
    env = json.loads(dump.read_text())
    assert env[EnvVars.openai_api_key].startswith("kat_") and env[EnvVars.api_key] == env[EnvVars.openai_api_key]
    blob = json.dumps(env)
    assert ADMIN_KEY not in blob and RUNNER_KEY not in blob and "s3cr3t" not in blob
    assert env["WANTED_BY_AGENT"] == "yes" and env["PATH"] == os.environ["PATH"]
    rollouts = client.get("/api/v1/rollouts", headers=_auth(ADMIN_KEY)).json()
    assert [r["status"] for r in rollouts] == ["succeeded", "succeeded"]
    # nothing logged or stored names a credential
    stored = json.dumps([client.get(f"/api/v1/rollouts/{r['rollout_id']}/spans", headers=_auth(ADMIN_KEY)).json()
                         for r in rollouts])  # fmt: skip
    for secret in (ADMIN_KEY, RUNNER_KEY, llm.api_key, env[EnvVars.api_key]):
        assert secret not in caplog.text and secret not in stored


def test_resources_record_of_an_endpoint_is_unchanged_by_auth() -> None:
    """The token never lands in stored records (it rides only on the dequeue answer)."""
    assert "token" not in ResourcesIn(llms={"main": LLMEndpoint(model="m")}).model_dump()
