"""Bad requests, unknown/finished attempts and engine failures get OpenAI-shaped errors; the server keeps serving."""

from __future__ import annotations

import httpx
import openai
import pytest

from agentkiln.models import AttemptStatus, FailureKind
from agentkiln.protocol import SpanAttrs, SpanNames
from agentkiln.store.memory import InMemoryStore
from tests.gateway_fakes import ScriptedEngine, ServedApp, gateway_app

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def env():
    store = InMemoryStore(sweep_interval_s=None)
    engine = ScriptedEngine(["ok"])
    app = gateway_app(store, engine)
    with ServedApp(app) as served:
        ar = served.call(store.start_rollout({"task": "e"}))
        served.rid, served.aid = ar.rollout.rollout_id, ar.attempt.attempt_id
        served.base = f"{served.url}/rollout/{served.rid}/attempt/{served.aid}/v1"
        served.store, served.engine, served.app = store, engine, app
        served.http = httpx.Client(timeout=10)
        yield served
        served.http.close()


def spans(env):
    return env.call(env.store.query_spans(env.rid, name=SpanNames.llm_call))


def assert_error(resp: httpx.Response, status: int, *, param=None, contains: str = "") -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and contains.lower() in err["message"].lower()
    if param is not None:
        assert err["param"] == param
    return err


def post(env, path: str, body, base=None):
    url = f"{base or env.url + '/v1'}{path}"
    if isinstance(body, (bytes, str)):
        return env.http.post(url, content=body, headers={"content-type": "application/json"})
    return env.http.post(url, json=body)


@pytest.mark.parametrize(
    "body, param, contains",
    [
        (b"{not json", None, "not valid JSON"),
        ([1, 2], None, "JSON object"),
        ({"model": "m"}, "messages", "messages"),
        ({"model": "m", "messages": []}, "messages", "at least 1"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "role"),
        ({"messages": USER, "temperature": 3}, "temperature", "temperature"),
        ({"messages": USER, "n": 0}, "n", ""),
        ({"messages": USER, "max_tokens": 0}, "max_tokens", ""),
        ({"messages": USER, "max_tokens": 10**6}, "max_tokens", "max_tokens"),
        ({"messages": USER, "tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools.0.type", ""),
        ({"messages": USER, "tools": [{"type": "function", "function": {}}]}, "tools.0.function.name", "name"),
        ({"messages": USER, "tool_choice": "required"}, "tool_choice", "tools"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages.0.content.0.type",
            "image_url",
        ),
        ({"messages": [{"role": "tool", "content": "r"}]}, "messages.0.tool_call_id", "tool_call_id"),
    ],
)
def test_bad_chat_bodies(env, body, param, contains):
    assert_error(post(env, "/chat/completions", body), 400, param=param, contains=contains)


@pytest.mark.parametrize(
    "body, param, contains",
    [
        ({"model": "m"}, "input", "input"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0.type", "web_search"),
        ({"input": [{"type": "file_search_call", "id": "x"}]}, "input.0.type", "file_search_call"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input.0.call_id", "call_id"),
        ({"input": []}, "input", "empty"),
        ({"input": "x", "max_output_tokens": -1}, "max_output_tokens", ""),
    ],
)
def test_bad_responses_bodies(env, body, param, contains):
    assert_error(post(env, "/responses", body), 400, param=param, contains=contains)


def test_sdk_sees_bad_request_with_message(env):
    c = openai.OpenAI(base_url=f"{env.url}/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model="m", messages=USER, temperature=9)
    assert "temperature" in info.value.message
    assert c.chat.completions.create(model="m", messages=USER).choices[0].message.content == "ok"


def test_unknown_rollout_attempt_and_finished_attempt(env):
    r = post(env, "/chat/completions", {"messages": USER}, base=f"{env.url}/rollout/nope/attempt/{env.aid}/v1")
    assert assert_error(r, 404, contains="nope")["code"] == "rollout_not_found"
    r = post(env, "/responses", {"input": "x"}, base=f"{env.url}/rollout/{env.rid}/attempt/nope/v1")
    assert assert_error(r, 404, contains="nope")["code"] == "attempt_not_found"
    r = env.http.post(f"{env.url}/v1/chat/completions", json={"messages": USER}, headers={"X-Kiln-Rollout-Id": env.rid})
    assert_error(r, 400, contains="X-Kiln-Attempt-Id")

    env.call(env.store.update_attempt(env.rid, env.aid, status=AttemptStatus.succeeded))
    r = post(env, "/chat/completions", {"messages": USER}, base=env.base)
    assert assert_error(r, 409, contains="succeeded")["code"] == "attempt_finished"
    assert spans(env) == []
    assert post(env, "/chat/completions", {"messages": USER}).status_code == 200  # plain /v1 still serves


@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize("exc, status", [(RuntimeError("CUDA exploded"), 502), (ConnectionError("down"), 503)])
def test_engine_failure_is_5xx_and_recorded(env, api, exc, status):
    env.engine.fail_with = exc
    path, body = ("/chat/completions", {"messages": USER}) if api == "chat" else ("/responses", {"input": "x"})
    err = assert_error(post(env, path, body, base=env.base), status, contains=str(exc))
    assert err["type"] == "server_error"
    (span,) = spans(env)
    assert span.status.code == "ERROR"
    assert span.attributes[SpanAttrs.failure_kind] == FailureKind.llm_error.value
    assert span.attributes[SpanAttrs.exception_type] == type(exc).__name__
    env.engine.fail_with = None
    assert post(env, path, body, base=env.base).status_code == 200


def test_engine_failure_before_first_token_of_stream_is_json_error(env):
    env.engine.fail_with = RuntimeError("no")
    r = post(env, "/chat/completions", {"messages": USER, "stream": True}, base=env.base)
    assert_error(r, 502, contains="no")


def test_mid_stream_failure_reaches_sdk_and_is_recorded(env):
    env.engine._script = ["a long enough reply to fail in the middle"]
    env.engine.fail_stream_after = 2
    c = openai.OpenAI(base_url=env.base, api_key="k", max_retries=0)
    with pytest.raises(openai.APIError, match="mid-stream"):
        for _ in c.chat.completions.create(model="m", messages=USER, stream=True):
            pass
    events = list(c.responses.create(model="m", input="x", stream=True))
    assert events[-1].type == "response.failed"
    assert any(e.type == "error" for e in events)
    got = spans(env)
    assert len(got) == 2 and all(s.status.code == "ERROR" for s in got)
    env.engine.fail_stream_after = None
    assert c.chat.completions.create(model="m", messages=USER).choices[0].message.content.startswith("a long")


def test_missing_engine_is_503(env):
    env.app.state.engine = None
    err = assert_error(post(env, "/chat/completions", {"messages": USER}), 503, contains="engine")
    assert err["code"] == "engine_missing"
    assert env.http.get(f"{env.url}/v1/models").json() == {"object": "list", "data": []}
