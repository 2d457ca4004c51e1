"""The unmodified openai SDK (sync, async, streaming, Responses API) against the gateway on a real port."""

from __future__ import annotations

import asyncio
import importlib.util

import openai
import pytest

from agentkiln.gateway.recording import resolve_agent_name
from agentkiln.protocol import SpanAttrs, SpanNames
from agentkiln.store.memory import InMemoryStore
from tests.gateway_fakes import ScriptedEngine, ServedApp, decode, gateway_app

REPLY = "The answer is 42."


@pytest.fixture
def env():
    store = InMemoryStore(sweep_interval_s=None)
    engine = ScriptedEngine([REPLY])
    with ServedApp(gateway_app(store, engine)) as served:
        ar = served.call(store.start_rollout({"task": "t"}))
        rid, aid = ar.rollout.rollout_id, ar.attempt.attempt_id
        served.rollout_url = f"{served.url}/rollout/{rid}/attempt/{aid}/v1"
        served.rid, served.aid, served.store, served.engine = rid, aid, store, engine
        yield served


def spans(env):
    return env.call(env.store.query_spans(env.rid, name=SpanNames.llm_call))


def client(base_url, api_key="sk-test", **kw):
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, **kw)


def test_sync_chat_is_answered_and_recorded(env):
    c = client(env.rollout_url, default_headers={"X-Kiln-Agent": "solver"})
    out = c.chat.completions.create(
        model="whatever", messages=[{"role": "user", "content": "6*7?"}], temperature=0, max_tokens=64
    )
    assert out.choices[0].message.content == REPLY
    assert out.choices[0].finish_reason == "stop"
    assert out.model == "whatever"  # echoed; the served version is on the span
    assert out.usage.completion_tokens == len(REPLY)
    (span,) = spans(env)
    a = span.attributes
    assert decode(a[SpanAttrs.response_token_ids]) == REPLY
    assert len(a[SpanAttrs.response_logprobs]) == len(REPLY)
    assert "6*7?" in decode(a[SpanAttrs.prompt_token_ids])
    assert a[SpanAttrs.agent_name] == "solver"
    assert a[SpanAttrs.model_version] == "v1"
    assert a[SpanAttrs.finish_reason] == "stop"
    assert a[SpanAttrs.parse_error] is None
    assert a[SpanAttrs.latency_s] >= 0
    assert a[SpanAttrs.request]["messages"] == [{"role": "user", "content": "6*7?"}]
    assert a[SpanAttrs.request]["temperature"] == 0
    assert a[SpanAttrs.response]["choices"][0]["message"]["content"] == REPLY
    assert span.status.code == "OK"


def test_plain_v1_is_served_not_recorded_unless_headers(env):
    c = client(f"{env.url}/v1")
    assert (
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}]).choices[0].message.content
        == REPLY
    )
    assert spans(env) == []
    c2 = client(f"{env.url}/v1", default_headers={"X-Kiln-Rollout-Id": env.rid, "X-Kiln-Attempt-Id": env.aid})
    c2.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert len(spans(env)) == 1


def test_models_list(env):
    assert [m.id for m in client(f"{env.url}/v1").models.list()] == ["scripted-model"]
    assert [m.id for m in client(env.rollout_url).models.list()] == ["scripted-model"]


def test_async_client_with_logprobs_and_metadata_agent(env):
    async def go():
        c = openai.AsyncOpenAI(base_url=env.rollout_url, api_key="k", max_retries=0)
        try:
            return await c.chat.completions.create(
                model="m",
                messages=[
                    {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
                    {"role": "user", "content": [{"type": "text", "text": "q"}]},
                ],
                logprobs=True,
                top_logprobs=2,
                metadata={"agent": "planner"},
                store=False,
            )
        finally:
            await c.close()

    out = asyncio.run(go())
    lp = out.choices[0].logprobs.content
    assert "".join(t.token for t in lp) == REPLY
    assert all(t.logprob < 0 for t in lp)
    (span,) = spans(env)
    assert span.attributes[SpanAttrs.agent_name] == "planner"
    assert span.attributes[SpanAttrs.request]["messages"][0] == {"role": "system", "content": "be brief"}
    assert [t.logprob for t in lp] == span.attributes[SpanAttrs.response_logprobs]


def test_streaming_matches_non_streaming_ids(env):
    c = client(env.rollout_url)
    msgs = [{"role": "user", "content": "stream please"}]
    full = c.chat.completions.create(model="m", messages=msgs, temperature=0)
    chunks = list(
        c.chat.completions.create(
            model="m", messages=msgs, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content == REPLY
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 1  # really incremental
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(REPLY)
    s_full, s_stream = spans(env)
    for key in (SpanAttrs.prompt_token_ids, SpanAttrs.response_token_ids, SpanAttrs.response_logprobs):
        assert s_full.attributes[key] == s_stream.attributes[key]


def test_stream_with_sdk_helper(env):
    c = client(env.rollout_url)
    with c.chat.completions.stream(model="m", messages=[{"role": "user", "content": "x"}]) as s:
        final = s.get_final_completion()
    assert final.choices[0].message.content == REPLY
    assert len(spans(env)) == 1


def test_n_choices_give_one_span_each(env):
    out = client(env.rollout_url).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], n=3)
    assert [ch.index for ch in out.choices] == [0, 1, 2]
    got = spans(env)
    assert sorted(s.attributes[SpanAttrs.choice_index] for s in got) == [0, 1, 2]
    assert all(len(s.attributes[SpanAttrs.response]["choices"]) == 1 for s in got)
    assert out.usage.completion_tokens == 3 * len(REPLY)


def test_max_tokens_length_finish(env):
    out = client(env.rollout_url).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], max_completion_tokens=4
    )
    assert out.choices[0].finish_reason == "length"
    assert out.choices[0].message.content == REPLY[:4]
    assert spans(env)[0].attributes[SpanAttrs.finish_reason] == "length"


def test_responses_api_non_streaming(env):
    c = client(env.rollout_url)
    r = c.responses.create(
        model="m", instructions="You are terse.", input="hello", max_output_tokens=50, metadata={"agent": "resp-agent"}
    )
    assert r.output_text == REPLY
    assert r.status == "completed"
    assert r.usage.output_tokens == len(REPLY)
    (span,) = spans(env)
    assert span.attributes[SpanAttrs.agent_name] == "resp-agent"
    assert span.attributes[SpanAttrs.request]["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hello"},
    ]
    assert span.attributes[SpanAttrs.response]["object"] == "response"
    assert decode(span.attributes[SpanAttrs.response_token_ids]) == REPLY


def test_responses_api_streaming(env):
    c = client(env.rollout_url)
    events = list(c.responses.create(model="m", input=[{"role": "user", "content": "hi"}], stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    for needed in (
        "response.output_item.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ):
        assert needed in types
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == REPLY
    assert events[-1].response.output_text == REPLY
    assert [e.sequence_number for e in events] == list(range(len(events)))
    non_stream = c.responses.create(model="m", input=[{"role": "user", "content": "hi"}])
    s1, s2 = spans(env)
    assert s1.attributes[SpanAttrs.response_token_ids] == s2.attributes[SpanAttrs.response_token_ids]
    assert non_stream.output_text == REPLY


def test_responses_stream_helper(env):
    c = client(env.rollout_url)
    with c.responses.stream(model="m", input="hi") as s:
        final = s.get_final_response()
    assert final.output_text == REPLY


def test_agent_name_resolution_order():
    msgs = [{"role": "system", "content": "s", "name": "sys-agent"}, {"role": "user", "content": "u"}]
    assert resolve_agent_name({"x-kiln-agent": "h"}, {"agent": "m"}, "u", msgs) == "h"
    assert resolve_agent_name({}, {"agent": "m"}, "u", msgs) == "m"
    assert resolve_agent_name({}, {}, "u", msgs) == "u"
    assert resolve_agent_name({}, None, None, msgs) == "sys-agent"
    assert resolve_agent_name({}, None, None, msgs[1:]) is None


# --------------------------------------------------------------------------- real tiny model


def _tiny_engine():
    if importlib.util.find_spec("agentkiln.engine.embedded") is None:
        pytest.skip("TransformersEngine not available yet")
    from agentkiln.engine.embedded import TransformersEngine
    from agentkiln.engine.model_files import load_tokenizer, tiny_model_dir

    path = tiny_model_dir()
    return TransformersEngine(path), load_tokenizer(path)


def test_tiny_transformers_engine_records_exact_tokens():
    engine, tok = _tiny_engine()
    store = InMemoryStore(sweep_interval_s=None)
    with ServedApp(gateway_app(store, engine)) as served:
        try:
            ar = served.call(store.start_rollout({"task": "t"}))
            url = f"{served.url}/rollout/{ar.rollout.rollout_id}/attempt/{ar.attempt.attempt_id}/v1"
            c = client(url)
            msgs = [{"role": "user", "content": "Say something."}]
            full = c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=8)
            streamed = "".join(
                ch.choices[0].delta.content or ""
                for ch in c.chat.completions.create(
                    model="tiny", messages=msgs, temperature=0, max_tokens=8, stream=True
                )
                if ch.choices
            )
            r = c.responses.create(model="tiny", input="Say something.", temperature=0, max_output_tokens=8)
            got = served.call(store.query_spans(ar.rollout.rollout_id, name=SpanNames.llm_call))
        finally:
            served.call(engine.close())
    assert len(got) == 3
    s_full, s_stream, s_resp = got
    ids = s_full.attributes[SpanAttrs.response_token_ids]
    assert ids and ids == s_stream.attributes[SpanAttrs.response_token_ids]
    assert s_full.attributes[SpanAttrs.prompt_token_ids] == s_stream.attributes[SpanAttrs.prompt_token_ids]
    assert s_resp.attributes[SpanAttrs.response_token_ids] == ids  # same prompt, greedy
    assert len(s_full.attributes[SpanAttrs.response_logprobs]) == len(ids)
    raw = tok.decode(ids, skip_special_tokens=True)
    assert full.choices[0].message.content == raw
    assert streamed == raw
    assert r.output_text == raw


def test_inside_full_server_app_with_api_key():
    """The router behind the real server's middlewares (API key, body limit, idempotency), streaming included."""
    from agentkiln.gateway.router import build_gateway_router
    from agentkiln.server.app import create_app

    store = InMemoryStore(sweep_interval_s=None)
    app = create_app(store, api_key="secret", sweep_interval_s=0)
    app.state.engine = ScriptedEngine([REPLY])
    if not any(getattr(r, "path", "") == "/v1/chat/completions" for r in app.routes):
        app.include_router(build_gateway_router())
    with ServedApp(app) as served:
        ar = served.call(store.start_rollout({"task": "t"}))
        url = f"{served.url}/rollout/{ar.rollout.rollout_id}/attempt/{ar.attempt.attempt_id}/v1"
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        c = openai.OpenAI(base_url=url, api_key="secret", max_retries=0)
        chunks = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == REPLY
        assert c.responses.create(model="m", input="x").output_text == REPLY
        got = served.call(store.query_spans(ar.rollout.rollout_id, name=SpanNames.llm_call))
    assert len(got) == 2


def test_default_max_tokens_and_incomplete_response():
    store = InMemoryStore(sweep_interval_s=None)
    with ServedApp(gateway_app(store, ScriptedEngine([REPLY]), default_max_tokens=5)) as served:
        c = client(f"{served.url}/v1")
        out = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert (out.choices[0].finish_reason, out.choices[0].message.content) == ("length", REPLY[:5])
        r = c.responses.create(model="m", input="x")
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
        assert c.responses.create(model="m", input="x", max_output_tokens=100).output_text == REPLY


def test_concurrent_calls_land_on_their_own_attempts():
    store = InMemoryStore(sweep_interval_s=None)
    engine = ScriptedEngine(lambda req: f"echo {req.messages[-1]['content']}")
    with ServedApp(gateway_app(store, engine)) as served:
        ars = [served.call(store.start_rollout({"i": i})) for i in range(6)]

        async def one(i, ar):
            url = f"{served.url}/rollout/{ar.rollout.rollout_id}/attempt/{ar.attempt.attempt_id}/v1"
            async with openai.AsyncOpenAI(base_url=url, api_key="k", max_retries=0) as c:
                msgs = [{"role": "user", "content": f"task {i}"}]
                if i % 2:
                    chunks = await c.chat.completions.create(model="m", messages=msgs, stream=True)
                    return "".join([ch.choices[0].delta.content or "" async for ch in chunks if ch.choices])
                return (await c.chat.completions.create(model="m", messages=msgs)).choices[0].message.content

        async def all_():
            return await asyncio.gather(*(one(i, ar) for i, ar in enumerate(ars)))

        assert asyncio.run(all_()) == [f"echo task {i}" for i in range(6)]
        for i, ar in enumerate(ars):
            (span,) = served.call(store.query_spans(ar.rollout.rollout_id, name=SpanNames.llm_call))
            assert span.attempt_id == ar.attempt.attempt_id
            assert decode(span.attributes[SpanAttrs.response_token_ids]) == f"echo task {i}"
