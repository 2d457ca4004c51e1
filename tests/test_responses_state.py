"""Responses API state through the real openai SDK: store, previous_response_id, retrieve, delete, input items.

The records live in the store (restart and replicas: tests/test_responses_durable.py).
"""

from __future__ import annotations

import time

import openai
import pytest

from agentkiln.gateway.errors import GatewayError
from agentkiln.gateway.responses.state import ResponseStates
from agentkiln.store.base import NotFoundError
from agentkiln.store.memory import InMemoryStore
from tests.gateway_fakes import ScriptedEngine, ServedApp, gateway_app, tool_call_text

TOOLS = [
    {
        "type": "function",
        "name": "add",
        "description": "Add two numbers",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
    }
]


@pytest.fixture
def env():
    store = InMemoryStore(sweep_interval_s=None)
    engine = ScriptedEngine([tool_call_text("add", {"a": 2, "b": 3}), "2 + 3 is 5.", "You are welcome."])
    with ServedApp(gateway_app(store, engine)) as served:
        ar = served.call(store.start_rollout({"task": "t"}))
        served.attempt_url = f"{served.url}/rollout/{ar.rollout.rollout_id}/attempt/{ar.attempt.attempt_id}/v1"
        served.engine = engine
        yield served


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="k", max_retries=0)


@pytest.mark.parametrize("prefix", ["plain", "attempt"])
def test_three_turn_conversation_with_a_tool_call(env, prefix):
    c = client(f"{env.url}/v1" if prefix == "plain" else env.attempt_url)
    r1 = c.responses.create(model="m", instructions="Be brief.", input="What is 2+3?", tools=TOOLS)
    (call,) = [it for it in r1.output if it.type == "function_call"]
    assert r1.store is True and call.name == "add"
    r2 = c.responses.create(
        model="m",
        previous_response_id=r1.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "5"}],
        tools=TOOLS,
    )
    assert r2.previous_response_id == r1.id and r2.output_text == "2 + 3 is 5."
    r3 = c.responses.create(model="m", previous_response_id=r2.id, input="Thanks!")
    assert r3.output_text == "You are welcome."

    third = env.engine.requests[-1].messages
    assert [m["role"] for m in third] == ["user", "assistant", "tool", "assistant", "user"]  # no instructions
    assert third[0]["content"] == "What is 2+3?"
    assert third[1]["tool_calls"][0]["function"]["name"] == "add"
    assert third[1]["tool_calls"][0]["id"] == call.call_id
    assert third[2] == {"role": "tool", "tool_call_id": call.call_id, "content": "5"}
    assert third[3]["content"] == "2 + 3 is 5." and third[4]["content"] == "Thanks!"
    assert env.engine.requests[0].messages[0] == {"role": "system", "content": "Be brief."}

    got = c.responses.retrieve(r2.id)
    assert got.id == r2.id and got.output_text == "2 + 3 is 5."
    items = c.responses.input_items.list(r2.id, order="asc")
    assert [it.type for it in items.data] == ["function_call_output"]
    assert [it.type for it in c.responses.input_items.list(r1.id).data] == ["message"]
    assert all(it.id for it in c.responses.input_items.list(r3.id).data)

    c.responses.delete(r2.id)
    with pytest.raises(openai.NotFoundError) as exc:
        c.responses.retrieve(r2.id)
    assert exc.value.body["code"] == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="m", previous_response_id=r2.id, input="again")


def test_unknown_and_unstored_ids_are_404_in_openai_shape(env):
    c = client(f"{env.url}/v1")
    with pytest.raises(openai.NotFoundError) as exc:
        c.responses.retrieve("resp_nope")
    assert exc.value.body["type"] == "invalid_request_error" and "resp_nope" in exc.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        c.responses.input_items.list("resp_nope")
    with pytest.raises(openai.NotFoundError):
        c.responses.delete("resp_nope")
    r = c.responses.create(model="m", input="hi", store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as exc:
        c.responses.create(model="m", input="hi", previous_response_id=r.id)
    assert exc.value.body["param"] == "previous_response_id"


def test_streamed_response_is_stored_and_continued(env):
    c = client(f"{env.url}/v1")
    env.engine._script = ["first answer", "second answer"]
    env.engine._next = 0
    with c.responses.stream(model="m", input="one") as s:
        r1 = s.get_final_response()
    r2 = c.responses.create(model="m", input="two", previous_response_id=r1.id)
    assert r2.output_text == "second answer"
    assert [m["content"] for m in env.engine.requests[-1].messages] == ["one", "first answer", "two"]


def test_stored_responses_expire_after_max_age():
    """Past its age a response answers 404 at once, and the purge deletes it from the store."""
    store = InMemoryStore(sweep_interval_s=None)
    states = ResponseStates(max_age_s=0.5, purge_interval_s=3600)
    with ServedApp(gateway_app(store, ScriptedEngine(["a", "b"]), response_states=states)) as served:
        c = client(f"{served.url}/v1")
        r = c.responses.create(model="m", input="hi")
        assert c.responses.retrieve(r.id).id == r.id
        assert served.call(store.get_response(r.id)).size > 0  # it lives in the store
        time.sleep(0.7)
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(r.id)
        with pytest.raises(openai.NotFoundError):
            c.responses.create(model="m", input="more", previous_response_id=r.id)
        assert served.call(states.purge(store)) == 1
        with pytest.raises(NotFoundError):
            served.call(store.get_response(r.id))


def test_stored_responses_are_bounded_by_bytes_oldest_first():
    """Stored calls purge in the background: past `max_bytes` the oldest records leave the store."""
    store = InMemoryStore(sweep_interval_s=None)
    states = ResponseStates(max_bytes=6_000, purge_interval_s=0.0)
    with ServedApp(gateway_app(store, ScriptedEngine(["x" * 400]), response_states=states)) as served:
        c = client(f"{served.url}/v1")
        ids = [c.responses.create(model="m", input=f"question {i}").id for i in range(12)]
        sizes = [served.call(store.get_response(rid)).size for rid in ids[-2:]]
        assert 1_000 < sizes[0] < 3_000  # so 12 of them are well over the bound

        def kept() -> list[str]:
            return [rid for rid in ids if rid in store._responses]

        give_up = time.monotonic() + 10
        while sum(store._responses[rid].size for rid in kept()) > 6_000 and time.monotonic() < give_up:
            time.sleep(0.05)
        assert kept() == ids[len(ids) - len(kept()) :] and 0 < len(kept()) < 12  # the newest stayed
        assert sum(store._responses[rid].size for rid in kept()) <= 6_000
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(ids[0])
        assert c.responses.retrieve(ids[-1]).id == ids[-1]


async def test_attempt_tokens_reach_only_their_own_stored_responses():
    from agentkiln.protocol import Principal, Role
    from agentkiln.server.auth import allowed

    me = Principal(Role.attempt, rollout_id="r1", attempt_id="a1")
    for path in ("/v1/responses/resp_1", "/v1/responses/resp_1/input_items"):
        assert allowed(me, "GET", path) and allowed(me, "DELETE", path)
    assert allowed(me, "GET", "/rollout/r1/attempt/a1/v1/responses/resp_1/input_items")
    assert not allowed(me, "GET", "/rollout/r2/attempt/a2/v1/responses/resp_1")
    for method, path in (("GET", "/api/v1/stored-responses/resp_1"), ("POST", "/api/v1/purge-stored-responses")):
        assert not allowed(me, method, path)  # the store's own routes: admin only
        assert not allowed(Principal(Role.runner), method, path)
    store, states = InMemoryStore(sweep_interval_s=None), ResponseStates()
    await states.put(store, {"id": "resp_1"}, [], [], owner=("r1", "a1"))
    assert (await states.get(store, "resp_1", ("r1", "a1"))).response["id"] == "resp_1"
    with pytest.raises(GatewayError) as exc:
        await states.get(store, "resp_1", ("r2", "a2"))  # another attempt's token: as if it did not exist
    assert exc.value.status_code == 404
    with pytest.raises(GatewayError):
        await states.delete(store, "resp_1", ("r2", "a2"))
    assert (await states.get(store, "resp_1")).response["id"] == "resp_1"  # admin / runner / keyless server
    with pytest.raises(GatewayError) as exc:
        await states.get(None, "resp_1")  # a gateway without a store keeps nothing
    assert exc.value.status_code == 503


async def test_an_id_no_store_can_hold_answers_404(store):
    """A NUL (PostgreSQL refuses it) or an id over 512 characters (HttpStore's route refuses it) is unknown: 404."""
    states = ResponseStates()
    for rid in ("resp_\x00", "r" * 600):
        with pytest.raises(GatewayError) as exc:
            await states.get(store, rid, param="previous_response_id")
        assert exc.value.status_code == 404 and exc.value.param == "previous_response_id"
        with pytest.raises(GatewayError) as exc:
            await states.delete(store, rid)
        assert exc.value.status_code == 404


async def test_agents_sdk_conversation_continued_by_previous_response_id():
    """The OpenAI Agents SDK, unmodified: a second `Runner.run` continues the first by `previous_response_id`."""
    from agents import Agent, OpenAIProvider, RunConfig, Runner, function_tool

    @function_tool
    def calculate(expression: str) -> str:
        """Evaluate an arithmetic expression."""
        return "391"

    def policy(req):
        last = req.messages[-1]
        if last["role"] == "tool":
            return f"The answer is {last['content']}."
        if "again" in str(last.get("content")):
            return "Still 391."
        return tool_call_text("calculate", {"expression": "17 * 23"})

    engine = ScriptedEngine(policy)
    with ServedApp(gateway_app(InMemoryStore(sweep_interval_s=None), engine)) as served:
        client = openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="k", max_retries=0)
        config = RunConfig(
            model_provider=OpenAIProvider(openai_client=client, use_responses=True), tracing_disabled=True
        )
        solver = Agent(name="solver", instructions="Use the calculator.", tools=[calculate], model="m")
        first = await Runner.run(solver, "What is 17 * 23?", run_config=config)
        assert first.final_output == "The answer is 391." and first.last_response_id
        second = await Runner.run(
            solver, "Say it again.", run_config=config, previous_response_id=first.last_response_id
        )
        assert second.final_output == "Still 391."
        await client.close()
    roles = [m["role"] for m in engine.requests[-1].messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "user"], roles
    assert engine.requests[-1].messages[1]["content"] == "What is 17 * 23?"
