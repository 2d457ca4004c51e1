"""Separate weights per agent: resources naming them, the engine serving them, the server loading them."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path

import httpx
import pytest
import torch

import agentkiln as kiln
from agentkiln.engine.base import ChatRequest
from agentkiln.engine.embedded import TransformersEngine
from agentkiln.engine.embedded.prefix_cache import PrefixCache
from agentkiln.engine.model_files import load_model, tiny_model_dir
from agentkiln.engine.upstream import UpstreamEngine
from agentkiln.engine.weight_roots import WeightsPolicy
from agentkiln.models import LLMEndpoint, ResourcesIn
from agentkiln.protocol import SpanAttrs, SpanNames
from agentkiln.runner.runner import Runner
from agentkiln.server.app import create_app
from agentkiln.server.serve import ServerThread
from agentkiln.store.client import HttpStore
from agentkiln.store.memory import InMemoryStore
from agentkiln.training.context import TrainingContext
from agentkiln.training.policies import agent_patterns
from tests.test_frameworks_common import FAST

SYSTEM = "You are one agent of a team. " + " ".join(f"Rule {i}: be brief about topic {i}." for i in range(20))


def _req(question: str, agent: str | None = None, **kw) -> ChatRequest:
    kw.setdefault("temperature", 0.0)
    kw.setdefault("max_tokens", 8)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return ChatRequest(messages=messages, agent=agent, **kw)


def _engine(**kw) -> TransformersEngine:
    return TransformersEngine(tiny_model_dir(), model_name="tiny", dtype="float32", **kw)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A random (non-zero) LoRA adapter for the tiny model, so its outputs differ from the base."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(11)
    model = get_peft_model(
        load_model(tiny_model_dir(), "float32"),
        LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    path = tmp_path_factory.mktemp("writer") / "adapter"
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def references(adapter_dir):
    """Uncached single-weights engines: the base model, and the adapter served as the main weights."""
    base, tuned = _engine(prefix_cache_tokens=0), _engine(prefix_cache_tokens=0)
    asyncio.run(tuned.load_weights(adapter_dir, "ref"))
    yield base, tuned
    asyncio.run(base.close())
    asyncio.run(tuned.close())


def _same(a, b) -> None:
    for ca, cb in zip(a.choices, b.choices, strict=True):
        assert ca.response_ids == cb.response_ids
        assert torch.allclose(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=1e-4)


# --------------------------------------------------------------------------- engine


async def test_engine_serves_each_agent_its_own_weights_concurrently(adapter_dir, references):
    base_ref, tuned_ref = references
    eng = _engine()
    try:
        await eng.load_weights(adapter_dir, "writer@v1", agent="writer")
        assert eng.model_version == "base" and eng.agent_versions == {"writer": "writer@v1"}
        assert eng.version_for("writer") == "writer@v1" and eng.version_for("critic") == "base"

        questions = [f"Question {i}: what about topic {i}?" for i in range(4)]
        reqs = [_req(q, agent) for q in questions for agent in ("writer", "critic", None)]
        before = copy.copy(eng.stats)
        results = await asyncio.gather(*(eng.chat(r) for r in reqs))
        assert eng.stats.max_active > 2  # both weight sets were decoding at the same time
        assert eng.stats.prefills - before.prefills < len(reqs)

        for req, res in zip(reqs, results):
            plain = req.model_copy(update={"agent": None})
            if req.agent == "writer":
                assert res.model_version == "writer@v1"
                _same(res, await tuned_ref.chat(plain))
            else:  # agents without their own weights get the main ones
                assert res.model_version == "base"
                _same(res, await base_ref.chat(plain))
        writer, critic = results[0], results[1]
        assert writer.choices[0].logprobs != critic.choices[0].logprobs

        # Streaming picks the weights the same way.
        deltas = [d async for d in eng.chat_stream(_req(questions[0], "writer"))]
        assert deltas[-1].final is not None and deltas[-1].final.model_version == "writer@v1"
        assert [t for d in deltas for t in d.token_ids] == writer.choices[0].response_ids

        await eng.unload_weights("writer")
        assert eng.agent_versions == {}
        again = await eng.chat(_req(questions[0], "writer"))
        assert again.model_version == "base"
        _same(again, critic)
    finally:
        await eng.close()


async def test_prefix_cache_never_crosses_weight_sets(adapter_dir, references):
    _, tuned_ref = references
    eng = _engine()
    try:
        await eng.load_weights(adapter_dir, "w1", agent="writer")
        req = _req("Shared prompt, first seen by the main weights.")
        await eng.chat(req)  # caches the prompt's KV under the main weights
        before = copy.copy(eng.stats)
        res = await eng.chat(req.model_copy(update={"agent": "writer"}))
        assert eng.stats.prefix_hits == before.prefix_hits  # main's KV is not reused for the writer
        _same(res, await tuned_ref.chat(req))
        before = copy.copy(eng.stats)
        await eng.chat(req.model_copy(update={"agent": "writer"}))
        assert eng.stats.prefix_hits == before.prefix_hits + 1  # its own KV is

        # Replacing one agent's weights drops only that agent's cached KV.
        main_tokens = eng.prefix_cache.match_length(eng.render(req).ids)
        await eng.load_weights(adapter_dir, "w2", agent="writer")
        assert eng.prefix_cache.match_length(eng.render(req).ids, scope="writer") == 0
        assert eng.prefix_cache.match_length(eng.render(req).ids) == main_tokens > 0
    finally:
        await eng.close()


def test_prefix_cache_scopes():
    def kv(n: int):
        return [(torch.zeros((1, 2, n, 4)), torch.zeros((1, 2, n, 4)))]

    cache = PrefixCache(max_tokens=100)
    cache.insert([1, 2, 3, 4], kv(4))
    assert cache.lookup([1, 2, 3, 4, 5], limit=4, scope="writer") is None
    cache.insert([1, 2, 3], kv(3), scope="writer")  # not "covered" by the main entry: other weights
    assert len(cache) == 2 and cache.lookup([1, 2, 3, 9], limit=3, scope="writer").length == 3
    cache.clear_scope("writer")
    assert len(cache) == 1 and cache.tokens == 4 and cache.match_length([1, 2]) == 2


# --------------------------------------------------------------------------- resources


def test_resources_name_weights_per_agent():
    res = ResourcesIn(
        llms={
            "writer": LLMEndpoint(model="m", adapter_path="/w", agent="writer"),
            "main": LLMEndpoint(model="m", adapter_path="/main"),
            "judge": LLMEndpoint(model="gpt", endpoint="https://example.invalid/v1"),
        }
    )
    assert res.main_llm().adapter_path == "/main"
    assert {a: e.adapter_path for a, e in res.agent_llms().items()} == {"writer": "/w"}
    with pytest.raises(ValueError, match="two endpoints"):
        ResourcesIn(llms={"a": LLMEndpoint(model="m", agent="x"), "b": LLMEndpoint(model="m", agent="x")})
    with pytest.raises(ValueError):
        LLMEndpoint(model="m", agent="bad name")
    # An agent's endpoint handed to the agent routes its calls as that agent.
    handle = kiln.LLMHandle.from_endpoint(
        "writer", res.llms["writer"], base_url="http://h/rollout/r/attempt/a/v1", api_key=None
    )
    assert handle.agent == "writer" and handle.base_url == "http://h/rollout/r/attempt/a/agent/writer/v1"


def test_agent_specs():
    assert agent_patterns(["writer", "a.b"]) == {"writer": "^writer$", "a.b": "^a\\.b$"}
    assert agent_patterns({"writer": "^(writer|rewriter)$"}) == {"writer": "^(writer|rewriter)$"}
    for bad in ([], "writer", ["main"], ["a b"], {"w": "("}):
        with pytest.raises((ValueError, TypeError)):
            agent_patterns(bad)
    with pytest.raises(ValueError):
        kiln.GRPO(agents=["writer"], agent_match="^writer$")


# --------------------------------------------------------------------------- server + gateway


@kiln.rollout
def writer_and_critic(task, llm, llms):
    """Writer by a per-agent URL, critic by a `kiln.agent` block, then the writer's published endpoint."""
    kw = llm.chat_kwargs(max_tokens=6, temperature=0.0)
    draft = (
        llm.for_agent("writer")
        .openai()
        .chat.completions.create(messages=[{"role": "user", "content": task["topic"]}], **kw)
    )
    with kiln.agent("critic"):
        llm.openai().chat.completions.create(messages=[{"role": "user", "content": task["topic"]}], **kw)
    if "writer" in llms:  # the endpoint naming the writer's weights calls as the writer
        llms["writer"].openai().chat.completions.create(messages=[{"role": "user", "content": "again"}], **kw)
    return 1.0 if draft.choices[0].message.content is not None else 0.0


async def _run_one(url: str, resources_id: str) -> list:
    async with HttpStore(url) as store:
        rollout = await store.enqueue_rollout({"topic": "tea"}, resources_id=resources_id)
        runner = Runner(writer_and_critic, url, n_workers=1, mode="thread", until_empty=True, config=FAST)
        assert await runner.arun() == 1
        spans = await store.query_spans(rollout.rollout_id, name=SpanNames.llm_call)
    return [(s.attributes[SpanAttrs.agent_name], s.attributes[SpanAttrs.model_version]) for s in spans]


async def _publish(store: HttpStore, ctx: TrainingContext, **agent_adapters: str | None) -> str:
    llms = {"main": LLMEndpoint(model="tiny")}
    for agent, path in agent_adapters.items():
        llms[agent] = LLMEndpoint(model="tiny", adapter_path=path, agent=agent)
    resources = await store.add_resources(ResourcesIn(llms=llms))
    await ctx.wait_for_resources_served(resources.resources_id, timeout=60)
    return resources.resources_id


async def test_server_loads_agent_weights_and_gateway_records_their_version(adapter_dir, tmp_path):
    engine = _engine()
    roots = WeightsPolicy.build([Path(adapter_dir).parent], env={})  # published weights load only from there
    store = InMemoryStore(sweep_interval_s=None)
    app = create_app(store, sweep_interval_s=0, model_sync_interval_s=0.05, weights_policy=roots)
    app.state.engine = engine
    server = ServerThread(app)
    url = server.start()
    try:
        async with HttpStore(url) as store:
            ctx = TrainingContext(store=store, server_url=url, run_dir=tmp_path)
            rid = await _publish(store, ctx, writer=adapter_dir)  # version 1
            status = await ctx.engine_status()
            assert status["agent_versions"] == {"writer": "writer@v1"} and status["model_version"] == "base"
            assert status["loaded_agents"] == {"writer": adapter_dir}
            calls = await _run_one(url, rid)
            assert calls == [("writer", "writer@v1"), ("critic", "base"), ("writer", "writer@v1")]

            swaps = engine.stats.weight_swaps
            rid = await _publish(store, ctx, writer=adapter_dir)  # version 2: nothing changed, nothing reloaded
            assert engine.stats.weight_swaps == swaps
            assert (await _run_one(url, rid))[0] == ("writer", "writer@v1")

            rid = await _publish(store, ctx)  # version 3: the writer has no weights of its own any more
            assert (await ctx.engine_status())["agent_versions"] == {}
            assert await _run_one(url, rid) == [("writer", "base"), ("critic", "base")]
    finally:
        server.stop()
        await engine.close()


async def test_upstream_engine_sends_agents_to_their_served_model():
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content)["model"])
        choice = {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        body = {"id": "x", "object": "chat.completion", "model": seen[-1], "choices": [choice]}
        return httpx.Response(200, json={**body, "prompt_token_ids": [1]})

    eng = UpstreamEngine(
        "http://fake/v1", model="base", transport=httpx.MockTransport(handler), agent_models={"writer": "writer-lora"}
    )
    try:
        writer = await eng.chat(_req("x", "writer", model="client-name"))
        critic = await eng.chat(_req("x", "critic", model="client-name"))
    finally:
        await eng.close()
    # Agents without their own model get the configured one, not the name they asked for (issue 20:
    # a vLLM serving another model answers a client's name with 404).
    assert seen == ["writer-lora", "base"]
    assert (writer.model_version, critic.model_version) == ("upstream:writer-lora", "upstream")
    assert eng.agent_versions == {"writer": "upstream:writer-lora"}
