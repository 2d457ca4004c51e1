"""The dashboard's JSON API (no browser): filters, one rollout's calls and skip reasons, runs, resources, auth."""

from __future__ import annotations

import json

import httpx
import pytest

from agentkiln.models import (
    AttemptError,
    AttemptStatus,
    FailureKind,
    LLMEndpoint,
    PromptTemplate,
    ResourcesIn,
    SpanIn,
)
from agentkiln.protocol import LLMCall, SpanAttrs, SpanNames
from agentkiln.server.app import create_app
from agentkiln.store import InMemoryStore, SqliteStore

API = "/api/v1/dashboard"


def _call_span(rid: str, aid: str, agent: str, logprobs: list[float] | None) -> SpanIn:
    call = LLMCall(
        agent=agent,
        call_id="c1",
        api="chat.completions",
        model_version="v1",
        request={"messages": [{"role": "user", "content": "What is 2+2?"}]},
        response={
            "choices": [
                {
                    "message": {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "t1",
                                "type": "function",
                                "function": {"name": "calculator", "arguments": '{"expression": "2+2"}'},
                            }
                        ],
                    }
                }
            ]
        },
        prompt_ids=[1, 2, 3],
        response_ids=[4, 5],
        logprobs=logprobs,
        finish_reason="tool_calls",
    )
    return SpanIn(rollout_id=rid, attempt_id=aid, name=SpanNames.llm_call, attributes=call.attributes())


async def _fill(store) -> dict[str, str]:
    v1 = await store.add_resources(
        ResourcesIn(llms={"main": LLMEndpoint(model="m")}, prompts={"system": PromptTemplate(template="Be brief.")})
    )
    await store.add_resources(
        ResourcesIn(
            llms={
                "main": LLMEndpoint(model="m", adapter_path="/a/step-1"),
                "s": LLMEndpoint(model="m", adapter_path="/a/solver", agent="solver"),
            },
            prompts={"system": PromptTemplate(template="Be very brief.")},
        )
    )
    good = await store.start_rollout(
        {"question": "apples"}, mode="train", resources_id=v1.resources_id, metadata={"group_id": "s1-0"}
    )
    rid, aid = good.rollout.rollout_id, good.attempt.attempt_id
    await store.add_spans(
        [
            _call_span(rid, aid, "solver", [-0.1, -2.0]),
            _call_span(rid, aid, "critic", None),  # no logprobs: left out of training, with the reason
            SpanIn(rollout_id=rid, attempt_id=aid, name=SpanNames.reward, attributes={SpanAttrs.reward_value: 0.75}),
        ]
    )
    await store.update_attempt(rid, aid, status=AttemptStatus.succeeded)
    bad = await store.start_rollout({"question": "pears"}, mode="val")
    await store.update_attempt(
        bad.rollout.rollout_id,
        bad.attempt.attempt_id,
        status=AttemptStatus.failed,
        error=AttemptError(kind=FailureKind.tool_error, message="calculator broke"),
    )
    waiting = await store.enqueue_rollout({"question": "plums"})
    return {"good": rid, "bad": bad.rollout.rollout_id, "waiting": waiting.rollout_id}


@pytest.fixture(params=["sqlite", "memory"])
async def client(request, tmp_path):
    store = SqliteStore(tmp_path / "d.db", sweep_interval_s=None) if request.param == "sqlite" else InMemoryStore()
    ids = await _fill(store)
    app = create_app(store, sweep_interval_s=0)
    app.state.run_dirs = [tmp_path / "run"]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
        c.ids, c.tmp = ids, tmp_path
        yield c
    await store.close()


async def _ids(client, **params) -> list[str]:
    resp = await client.get(f"{API}/rollouts", params=params)
    assert resp.status_code == 200, resp.text
    return [r["rollout_id"] for r in resp.json()["rows"]]


async def test_filters_narrow_the_rollouts_table(client):
    ids = client.ids
    assert await _ids(client) == [ids["waiting"], ids["bad"], ids["good"]]  # newest first
    assert await _ids(client, failure_kind="tool_error") == [ids["bad"]]
    assert await _ids(client, failure_kind="loop") == []
    assert await _ids(client, status="succeeded") == [ids["good"]]
    assert await _ids(client, mode="val") == [ids["bad"]]
    assert await _ids(client, agent="solver") == [ids["good"]]
    assert await _ids(client, version=1) == [ids["good"]]
    assert await _ids(client, q="pears") == [ids["bad"]]
    assert await _ids(client, q="100%_") == []
    page = (await client.get(f"{API}/rollouts", params={"limit": 2, "offset": 1})).json()
    assert [r["rollout_id"] for r in page["rows"]] == [ids["bad"], ids["good"]] and not page["has_more"]
    assert page["total"] == 3
    row = (await client.get(f"{API}/rollouts", params={"status": "succeeded"})).json()["rows"][0]
    assert row["reward"] == 0.75 and row["version"] == 1
    bad = (await client.get(f"{API}/rollouts", params={"status": "failed"})).json()["rows"][0]
    assert bad["failure_kind"] == "tool_error" and "calculator" in bad["failure_message"]


async def test_bad_filters_are_422(client):
    for params in ({"failure_kind": "nope"}, {"limit": 0}, {"version": 0}, {"status": "done"}):
        resp = await client.get(f"{API}/rollouts", params=params)
        assert resp.status_code == 422 and resp.json()["error"]["message"], params


async def test_one_rollout_says_which_calls_became_transitions(client):
    resp = await client.get(f"{API}/rollouts/{client.ids['good']}")
    assert resp.status_code == 200
    d = resp.json()
    solver, critic = d["calls"]
    assert solver["became_transition"] and solver["skip_reason"] is None
    assert [t["logprob"] for t in solver["tokens"]] == [-0.1, -2.0]
    assert not critic["became_transition"] and critic["skip_reason"] == "no_logprobs"
    assert d["transitions"] == 1 and d["reward"] == 0.75
    convo = {c["agent"]: c["messages"] for c in d["conversations"]}
    assert convo["solver"][0] == {
        "role": "user",
        "name": None,
        "content": "What is 2+2?",
        "tool_calls": [],
        "tool_call_id": None,
    }
    assert convo["solver"][-1]["tool_calls"][0]["name"] == "calculator"
    assert [s["name"] for s in d["timeline"]] == [SpanNames.llm_call, SpanNames.llm_call, SpanNames.reward]
    assert (await client.get(f"{API}/rollouts/ro-nope")).status_code == 404


async def test_overview_counts(client):
    s = (await client.get(f"{API}/overview")).json()["summary"]
    assert s["queue_depth"] == 1 and s["failures_by_kind"] == {"tool_error": 1}
    assert s["attempts_by_status"] == {"succeeded": 1, "failed": 1} and s["recent_finished"] == 2


async def test_runs_read_the_history_file(client, monkeypatch):
    monkeypatch.setenv("KILN_RUNS_DIR", str(client.tmp / "no-runs-here"))  # not the checkout's ./runs (kiln demo's)
    assert (await client.get(f"{API}/runs")).json()["runs"] == []
    run = client.tmp / "run"
    run.mkdir()
    (run / "history.jsonl").write_text(
        "".join(json.dumps({"step": s, "train_reward": s / 4}) + "\n" for s in (1, 2)) + '{"st'
    )
    (run / "result.json").write_text(json.dumps({"val_before": 0.1, "best_val": 0.5, "best_checkpoint": "x/best"}))
    (listed,) = (await client.get(f"{API}/runs")).json()["runs"]
    info = (await client.get(f"{API}/runs/{listed['key']}")).json()
    assert [h["step"] for h in info["history"]] == [1, 2]  # the half-written line is skipped
    assert info["val_before"] == 0.1 and info["best_checkpoint"] == "x/best"
    assert info["rollout_rewards"] == [{"step": 1, "reward": 0.75, "rollout_id": client.ids["good"]}]
    assert (await client.get(f"{API}/runs/..%2F..%2Fetc")).status_code == 404


async def test_resources_show_adapters_per_agent_and_prompt_diffs(client):
    v2, v1 = (await client.get(f"{API}/resources")).json()["versions"]
    assert v2["adapters"] == {
        "*": {"model": "m", "adapter_path": "/a/step-1"},
        "solver": {"model": "m", "adapter_path": "/a/solver"},
    }
    assert "-Be brief." in v2["prompt_diffs"]["system"] and "+Be very brief." in v2["prompt_diffs"]["system"]
    assert v1["prompt_diffs"] == {}


async def test_pages_are_public_shells_and_the_data_needs_the_admin_key(tmp_path):
    store = InMemoryStore()
    app = create_app(store, api_key="admin-key", runner_key="runner-key", sweep_interval_s=0)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
        for page in ("/", "/runs", "/rollouts", "/rollout", "/resources", "/dashboard/static/uPlot.iife.min.js"):
            assert (await c.get(page)).status_code == 200, page
        assert (await c.get("/dashboard/static/nope.js")).status_code == 401  # not a shipped asset: not public
        assert (await c.get(f"{API}/overview")).status_code == 401
        runner = await c.get(f"{API}/overview", headers={"Authorization": "Bearer runner-key"})
        assert runner.status_code == 403 and "admin" in runner.json()["error"]["message"]
        assert (await c.get(f"{API}/overview", headers={"Authorization": "Bearer admin-key"})).status_code == 200
    await store.close()


async def test_a_slow_summary_is_reused_a_fast_one_is_not(monkeypatch):
    from agentkiln.dashboard import queries

    store = InMemoryStore()
    assert (await queries.store_summary(store)).queue_depth == 0
    await store.enqueue_rollout({"q": 1})
    assert (await queries.store_summary(store)).queue_depth == 1  # fast: counted afresh
    monkeypatch.setattr(queries, "CACHE_ABOVE_S", 0.0)  # now every summary counts as slow...
    monkeypatch.setattr(queries, "CACHE_FACTOR", 1e6)  # ...and is reused for a long while
    assert (await queries.store_summary(store)).queue_depth == 1
    await store.enqueue_rollout({"q": 2})
    assert (await queries.store_summary(store)).queue_depth == 1  # reused
    queries._summaries.clear()  # the reuse ends
    assert (await queries.store_summary(store)).queue_depth == 2
    await store.close()
