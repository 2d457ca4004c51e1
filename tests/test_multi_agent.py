"""Multi-agent rollouts: naming agents (per-agent URL, `kiln.agent` blocks) and training only some of them."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

import agentkiln as kiln
from agentkiln.adapter.transitions import SkipReason, build_transitions
from agentkiln.engine.base import ChatRequest
from agentkiln.protocol import SpanAttrs, SpanNames
from agentkiln.runner.identity import current_agent
from agentkiln.store.memory import InMemoryStore
from tests.gateway_fakes import ScriptedEngine, ServedApp, gateway_app
from tests.test_frameworks_common import serving, system_text

TASK = {"topic": "tea"}


@pytest.fixture
def kiln_server():
    yield from serving()


def policy(req: ChatRequest) -> str:
    if "checker" in system_text(req):
        return "OK" if "green" in str(req.messages[-1]["content"]).lower() else "REVISE: name a kind of tea"
    drafts = sum(1 for m in req.messages if m.get("role") == "assistant")
    return "Tea is nice." if drafts == 0 else "Green tea is nice."


@kiln.rollout
def writer_and_checker(task, llm):
    """Writer named by its base URL; checker by a `kiln.agent` block around the handle's own client."""
    writer = llm.for_agent("writer").openai()
    checker = llm.openai()
    history = [{"role": "system", "content": "You are the writer."}, {"role": "user", "content": task["topic"]}]
    for _ in range(3):
        draft = writer.chat.completions.create(messages=history, **llm.chat_kwargs()).choices[0].message.content
        history.append({"role": "assistant", "content": draft})
        with kiln.agent("checker"):
            verdict = checker.chat.completions.create(
                messages=[{"role": "system", "content": "You are the checker."}, {"role": "user", "content": draft}],
                **llm.chat_kwargs(),
            )
        text = verdict.choices[0].message.content
        if text.startswith("OK"):
            return 1.0
        history.append({"role": "user", "content": text})
    return 0.0


async def test_select_writer_only_and_report_checker_calls(kiln_server):
    run = await kiln_server(ScriptedEngine(policy)).run(writer_and_checker, TASK)
    assert run.attempt.status.value == "succeeded", run.attempt.error
    assert run.agents() == ["writer", "checker", "writer", "checker"]
    assert run.rewards == [1.0]

    result = build_transitions(run.rollout, run.attempts, run.spans, agent_match="^writer$")
    writer_seq = [s.sequence_id for s in run.calls if s.attributes[SpanAttrs.agent_name] == "writer"]
    checker_seq = [s.sequence_id for s in run.calls if s.attributes[SpanAttrs.agent_name] == "checker"]
    assert [t.agent for t in result.transitions] == ["writer", "writer"]
    writer_spans = [s for s in run.calls if s.sequence_id in writer_seq]
    assert [t.response_ids for t in result.transitions] == [
        s.attributes[SpanAttrs.response_token_ids] for s in writer_spans
    ]
    assert all(t.return_ == 1.0 for t in result.transitions) and result.transitions[-1].done
    skipped = {(s.sequence_id, s.reason, s.agent) for s in result.report}
    assert skipped == {(seq, SkipReason.agent_not_selected, "checker") for seq in checker_seq}

    everyone = build_transitions(run.rollout, run.attempts, run.spans)
    assert [t.agent for t in everyone.transitions] == ["writer", "checker", "writer", "checker"]


# --------------------------------------------------------------------------- the per-agent route


@pytest.fixture
def gateway():
    store = InMemoryStore(sweep_interval_s=None)
    with ServedApp(gateway_app(store, ScriptedEngine(("hi",)))) as served:
        ar = served.call(store.start_rollout({"t": 1}))
        served.store, served.rid = store, ar.rollout.rollout_id
        served.attempt_url = f"{served.url}/rollout/{ar.rollout.rollout_id}/attempt/{ar.attempt.attempt_id}"
        yield served


def recorded_agents(gw) -> list[str | None]:
    spans = gw.call(gw.store.query_spans(gw.rid, name=SpanNames.llm_call))
    return [s.attributes[SpanAttrs.agent_name] for s in spans]


def test_agent_route_records_name_and_beats_header(gateway):
    handle = kiln.LLMHandle(base_url=f"{gateway.attempt_url}/v1", model="m")
    client = openai.OpenAI(base_url=handle.for_agent("planner.v2").base_url, api_key="k", max_retries=0)
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], extra_headers={"X-Kiln-Agent": "other"}
    )
    client.responses.create(model="m", input="x")
    assert recorded_agents(gateway) == ["planner.v2"] * 3
    assert client.models.list().data[0].id == "scripted-model"


@pytest.mark.parametrize("name", ["bad%20name", "a" * 129, "caf%C3%A9", "x%2Fy"])
def test_agent_route_rejects_bad_names(gateway, name):
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    resp = httpx.post(f"{gateway.attempt_url}/agent/{name}/v1/chat/completions", json=body)
    assert resp.status_code in (400, 404), resp.text  # an encoded "/" never matches the route
    if resp.status_code == 400:
        assert resp.json()["error"]["code"] == "invalid_agent_name"
    assert httpx.get(f"{gateway.attempt_url}/agent/{name}/v1/models").status_code in (400, 404)
    assert recorded_agents(gateway) == []


# --------------------------------------------------------------------------- kiln.agent and the handle's clients


def test_agent_block_names_calls_of_handle_clients(gateway):
    handle = kiln.LLMHandle(base_url=f"{gateway.attempt_url}/v1", model="m")
    sync_client = handle.openai(max_retries=0)
    own_client = openai.OpenAI(base_url=handle.base_url, api_key="k", http_client=handle.http_client())
    msgs = [{"role": "user", "content": "x"}]
    with kiln.agent("outer"):
        sync_client.chat.completions.create(model="m", messages=msgs)
        with kiln.agent("inner"):
            own_client.chat.completions.create(model="m", messages=msgs)
        assert current_agent() == "outer"
    sync_client.chat.completions.create(model="m", messages=msgs)  # outside any block: no name

    async def two_tasks():
        client = handle.async_openai(max_retries=0)

        async def call_as(name: str):
            async with kiln.agent(name):
                await asyncio.sleep(0)  # interleave the tasks: each keeps its own name
                await client.chat.completions.create(model="m", messages=msgs)

        await asyncio.gather(call_as("a"), call_as("b"))
        await client.close()

    asyncio.run(two_tasks())
    assert recorded_agents(gateway)[:3] == ["outer", "inner", None]
    assert sorted(recorded_agents(gateway)[3:]) == ["a", "b"]


def test_for_agent_outside_a_kiln_url_sends_the_header():
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("x-kiln-agent"))
        return httpx.Response(200, json={"object": "list", "data": []})

    handle = kiln.LLMHandle(base_url="http://upstream.invalid/v1", model="m").for_agent("critic")
    assert handle.base_url == "http://upstream.invalid/v1"
    client = handle.openai(http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    with kiln.agent("ignored"):  # the handle's fixed name wins
        client.models.list()
    assert seen == ["critic"]


@pytest.mark.parametrize("bad", ["", "a b", "x/y", "é", "a" * 129])
def test_bad_agent_names_are_refused_client_side(bad):
    with pytest.raises(ValueError):
        kiln.agent(bad)
    with pytest.raises(ValueError):
        kiln.LLMHandle(base_url=None, model="m").for_agent(bad)
