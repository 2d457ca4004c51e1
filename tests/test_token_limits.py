"""Honest token limits: no client limit generates until a stop or the context; `length` only for a limit really hit."""

from __future__ import annotations

import openai

from agentkiln.engine.base import ChatRequest
from agentkiln.engine.limits import MAX_TOTAL_TOKENS, unlimited_cap
from agentkiln.store.memory import InMemoryStore
from tests.gateway_fakes import ScriptedEngine, ServedApp, gateway_app

LONG = "word " * 200  # 1,000 tokens for the scripted engine (one per character): well past the old cap of 256


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="k", max_retries=0)


def test_no_client_limit_means_no_cap_and_no_false_length():
    engine = ScriptedEngine([LONG])
    with ServedApp(gateway_app(InMemoryStore(sweep_interval_s=None), engine)) as served:
        c = client(f"{served.url}/v1")
        out = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert (out.choices[0].finish_reason, out.choices[0].message.content) == ("stop", LONG)
        r = c.responses.create(model="m", input="x")
        assert r.status == "completed" and r.incomplete_details is None and r.output_text == LONG
        with c.responses.stream(model="m", input="x") as s:
            assert s.get_final_response().status == "completed"
        assert engine.requests[0].max_tokens is None
        # A limit the client set and the model reached is still reported.
        out = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=10)
        assert out.choices[0].finish_reason == "length"
        assert c.responses.create(model="m", input="x", max_output_tokens=10).status == "incomplete"


def test_server_default_bounds_clients_that_send_none():
    app = gateway_app(InMemoryStore(sweep_interval_s=None), ScriptedEngine([LONG]))
    app.state.max_tokens_default = 7  # what `kiln serve --max-tokens-default 7` sets
    with ServedApp(app) as served:
        c = client(f"{served.url}/v1")
        out = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert (out.choices[0].finish_reason, out.choices[0].message.content) == ("length", LONG[:7])
        r = c.responses.create(model="m", input="x")
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
        assert c.responses.create(model="m", input="x", max_output_tokens=2000).status == "completed"


def test_n_times_max_tokens_checks_stay_consistent():
    with ServedApp(gateway_app(InMemoryStore(sweep_interval_s=None), ScriptedEngine(["hi"]))) as served:
        c = client(f"{served.url}/v1")
        # No limit with n=64 is accepted: the engine bounds each choice at unlimited_cap(n).
        out = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], n=64)
        assert len(out.choices) == 64
        try:
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], n=64, max_tokens=2048)
        except openai.BadRequestError as exc:
            assert exc.body["code"] == "too_many_tokens"
        else:
            raise AssertionError("n x max_tokens over the limit was accepted")
    assert unlimited_cap(64) * 64 <= MAX_TOTAL_TOKENS and unlimited_cap(1) == 32_768
    assert ChatRequest(messages=[], n=64).max_tokens is None


def test_embedded_engine_generates_to_the_context_limit(tmp_path):
    """The tiny engine with no limit: the sequence may run to the context (not 256), and says `length` there."""
    from agentkiln.engine.embedded import TransformersEngine
    from agentkiln.engine.model_files import tiny_model_dir

    engine = TransformersEngine(tiny_model_dir(), model_name="tiny")
    prompt = [1] * 100
    seq = engine._make_seq(ChatRequest(messages=[]), prompt, 0, (lambda *a: None, lambda *a: None))
    assert seq.max_tokens == engine.max_context - len(prompt) > 256
    seq = engine._make_seq(ChatRequest(messages=[], max_tokens=5), prompt, 0, (lambda *a: None, lambda *a: None))
    assert seq.max_tokens == 5


async def test_agents_sdk_long_answer_without_a_limit_is_complete():
    """The Agents SDK sets no max_output_tokens by default; a long answer used to come back `incomplete`."""
    from agents import Agent, OpenAIProvider, RunConfig, Runner

    with ServedApp(gateway_app(InMemoryStore(sweep_interval_s=None), ScriptedEngine([LONG]))) as served:
        client = openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="k", max_retries=0)
        config = RunConfig(
            model_provider=OpenAIProvider(openai_client=client, use_responses=True), tracing_disabled=True
        )
        result = await Runner.run(Agent(name="writer", instructions="Write.", model="m"), "Write.", run_config=config)
        await client.close()
    assert result.final_output == LONG
    assert all(r.usage.output_tokens == len(LONG) for r in result.raw_responses)
