"""Embedded transformers engine on the tiny random model (fast) plus one real-model check (slow)."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from agentkiln.engine.base import ChatRequest
from agentkiln.engine.embedded import TransformersEngine
from agentkiln.engine.model_files import load_model, smollm2_dir, tiny_model_dir


def _req(content: str = "Tell me a story.", **kw) -> ChatRequest:
    kw.setdefault("temperature", 0.0)
    kw.setdefault("max_tokens", 12)
    return ChatRequest(messages=[{"role": "user", "content": content}], **kw)


@pytest.fixture(scope="module")
def engine():
    eng = TransformersEngine(tiny_model_dir(), model_name="tiny", dtype="float32", max_batch_size=8)
    yield eng
    asyncio.run(eng.close())


async def test_concurrent_requests_are_batched(engine):
    before = copy.copy(engine.stats)
    reqs = [_req(f"Question number {i}?", max_tokens=8 + i) for i in range(8)]
    results = await asyncio.gather(*(engine.chat(r) for r in reqs))
    prefills = engine.stats.prefills - before.prefills
    assert prefills < 8
    assert engine.stats.max_active > 1
    # batched results equal the unbatched ones (left padding and joins do not change greedy output)
    alone = await engine.chat(reqs[5])
    assert results[5].choices[0].response_ids == alone.choices[0].response_ids


async def test_result_ids_text_and_logprobs(engine):
    res = await engine.chat(_req())
    choice = res.choices[0]
    assert res.model == "tiny" and res.model_version == "base"
    assert res.prompt_ids == engine.tokenizer(res.prompt_text, add_special_tokens=False)["input_ids"]
    assert engine.tokenizer.decode(choice.response_ids, skip_special_tokens=True) == choice.raw_text
    assert len(choice.logprobs) == len(choice.response_ids) == 12
    assert all(lp <= 0.0 for lp in choice.logprobs)
    assert choice.finish_reason == "length"


async def test_logprobs_match_a_full_forward(engine):
    """Recorded logprobs equal what a trainer recomputes from (prompt + response) in one pass."""
    res = await engine.chat(_req(temperature=0.7, seed=3))
    choice = res.choices[0]
    ids = torch.tensor([res.prompt_ids + choice.response_ids])
    with torch.inference_mode():
        logits = engine._model(ids).logits[0, len(res.prompt_ids) - 1 : -1].float() / 0.7
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(choice.response_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(choice.logprobs), expected, atol=1e-4)


async def test_stream_matches_chat(engine):
    req = _req("Stream this please", max_tokens=16)
    res = await engine.chat(req)
    deltas = [d async for d in engine.chat_stream(req)]
    assert [t for d in deltas for t in d.token_ids] == res.choices[0].response_ids
    assert all(d.final is None for d in deltas[:-1])
    final = deltas[-1].final
    assert final is not None and final.choices[0].response_ids == res.choices[0].response_ids
    assert "".join(d.text for d in deltas) == res.choices[0].text


async def test_stop_string(engine):
    full = (await engine.chat(_req(max_tokens=12))).choices[0]
    stop = full.raw_text[len(full.raw_text) // 2 :][:3]
    assert stop.strip()
    res = (await engine.chat(_req(max_tokens=12, stop=[stop]))).choices[0]
    assert res.finish_reason == "stop"
    assert stop not in res.text and res.text == full.raw_text[: full.raw_text.find(stop)]
    assert len(res.response_ids) < 12 and res.response_ids == full.response_ids[: len(res.response_ids)]
    deltas = [d async for d in engine.chat_stream(_req(max_tokens=12, stop=[stop]))]
    assert "".join(d.text for d in deltas) == res.text


async def test_seeded_sampling_reproducible_and_n(engine):
    req = _req(temperature=1.0, seed=1234, n=3, max_tokens=10)
    a, b = await asyncio.gather(engine.chat(req), engine.chat(req))
    ids_a = [c.response_ids for c in a.choices]
    assert ids_a == [c.response_ids for c in b.choices]
    assert len(ids_a) == 3 and len({tuple(x) for x in ids_a}) == 3
    other = await engine.chat(_req(temperature=1.0, seed=99, max_tokens=10))
    assert other.choices[0].response_ids != ids_a[0]


async def test_stream_rejects_n_above_one(engine):
    with pytest.raises(ValueError):
        async for _ in engine.chat_stream(_req(n=2)):
            pass


async def test_load_lora_adapter_and_full_weights(engine, tmp_path):
    from peft import LoraConfig, get_peft_model

    req = _req(max_tokens=10)
    base = (await engine.chat(req)).choices[0]

    torch.manual_seed(7)
    peft_model = get_peft_model(
        load_model(tiny_model_dir(), "float32"),
        LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    await engine.load_weights(str(tmp_path / "adapter"), "v1")
    assert engine.model_version == "v1"
    tuned = await engine.chat(req)
    assert tuned.model_version == "v1"
    assert tuned.choices[0].logprobs != base.logprobs

    await engine.load_weights(str(tiny_model_dir()), "v2")  # full checkpoint: back to the original weights
    again = await engine.chat(req)
    assert again.model_version == "v2" and again.choices[0].response_ids == base.response_ids
    assert engine.stats.weight_swaps >= 2


@pytest.mark.slow
async def test_real_model_answers_sensibly():
    path = smollm2_dir()
    assert (path / "model.safetensors").is_file() and smollm2_dir() == path  # cached, not reconverted
    eng = TransformersEngine(path, dtype="bfloat16")
    try:
        res = await eng.chat(_req("What is the capital of France?", max_tokens=24))
    finally:
        await eng.close()
    assert "Paris" in res.choices[0].text
    assert res.choices[0].finish_reason == "stop"


# ---- prefix KV cache ------------------------------------------------------------------------------

SYSTEM = "You are a careful agent. " + " ".join(f"Tool t{i} takes argument a{i} and returns r{i}." for i in range(30))


def _agent_req(question: str, history: list[dict] | None = None, **kw) -> ChatRequest:
    kw.setdefault("temperature", 0.0)
    kw.setdefault("max_tokens", 10)
    messages = [{"role": "system", "content": SYSTEM}, *(history or []), {"role": "user", "content": question}]
    return ChatRequest(messages=messages, **kw)


@pytest.fixture(scope="module")
def uncached():
    eng = TransformersEngine(tiny_model_dir(), model_name="tiny", dtype="float32", prefix_cache_tokens=0)
    yield eng
    asyncio.run(eng.close())


async def test_prefix_cache_hits_on_shared_prefix(engine):
    first = await engine.chat(_agent_req("What does tool t3 return?"))
    before = copy.copy(engine.stats)
    second = await engine.chat(_agent_req("What does tool t7 take?"))
    shared = next(i for i, (a, b) in enumerate(zip(first.prompt_ids, second.prompt_ids)) if a != b)
    assert shared > 200
    assert engine.stats.prefix_hits - before.prefix_hits == 1
    assert engine.stats.prefix_hit_tokens - before.prefix_hit_tokens == shared
    assert engine.stats.prefill_tokens - before.prefill_tokens == len(second.prompt_ids) - shared
    # an identical prompt still prefills one token (for the last logits)
    before = copy.copy(engine.stats)
    await engine.chat(_agent_req("What does tool t7 take?"))
    assert engine.stats.prefill_tokens - before.prefill_tokens == 1


async def test_cached_outputs_equal_uncached(engine, uncached):
    """Greedy ids identical and logprobs within 1e-4 (fp32), for hits, misses, partial hits and batched joins."""
    reqs = [_agent_req(f"Question {i}: which tool computes r{i}?", max_tokens=12) for i in range(6)]
    reqs += [_req("Tell me a story."), _agent_req("Sampled", temperature=0.8, seed=5, n=3)]
    cached = await asyncio.gather(*(engine.chat(r) for r in reqs))
    cached += [await engine.chat(r) for r in reqs]  # second pass: full hits
    plain = await asyncio.gather(*(uncached.chat(r) for r in reqs))
    for a, b in zip(cached, plain + plain):
        for ca, cb in zip(a.choices, b.choices):
            assert ca.response_ids == cb.response_ids
            assert torch.allclose(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=1e-4)
    assert engine.stats.prefix_hit_tokens > 0 and uncached.stats.prefix_hit_tokens == 0


async def test_multi_turn_reuses_previous_prompt_and_response(engine, uncached):
    turn1 = _agent_req("Call tool t5 please.", max_tokens=8)
    res1 = await engine.chat(turn1)
    history = [
        {"role": "user", "content": "Call tool t5 please."},
        {"role": "assistant", "content": res1.choices[0].text},
    ]
    turn2 = _agent_req("Now explain the result.", history=history, max_tokens=8)
    before = copy.copy(engine.stats)
    res2 = await engine.chat(turn2)
    assert engine.stats.prefix_hit_tokens - before.prefix_hit_tokens >= len(res1.prompt_ids)
    assert res2.choices[0].response_ids == (await uncached.chat(turn2)).choices[0].response_ids


async def test_concurrent_shared_prefix_requests_batch_and_share(engine):
    before = copy.copy(engine.stats)
    reqs = [_agent_req(f"Fresh question {i} about tool t{i}?", max_tokens=6 + i) for i in range(8)]
    reqs = [
        r.model_copy(update={"messages": [{"role": "system", "content": "New prefix. " + SYSTEM}, *r.messages[1:]]})
        for r in reqs
    ]
    results = await asyncio.gather(*(engine.chat(r) for r in reqs))
    assert engine.stats.prefills - before.prefills < 8  # usually 2: one wave computes the prefix, one reuses it
    assert engine.stats.max_active > 1
    assert engine.stats.prefix_hits - before.prefix_hits >= 7
    total = sum(len(r.prompt_ids) for r in results)
    assert engine.stats.prefill_tokens - before.prefill_tokens < total / 2


async def test_load_weights_clears_prefix_cache(tmp_path):
    eng = TransformersEngine(tiny_model_dir(), model_name="tiny", dtype="float32")
    try:
        req = _agent_req("Anything?")
        base = await eng.chat(req)
        assert eng.prefix_cache is not None and len(eng.prefix_cache) > 0
        await eng.load_weights(str(tiny_model_dir()), "v2")
        assert len(eng.prefix_cache) == 0 and eng.prefix_cache.tokens == 0
        before = copy.copy(eng.stats)
        again = await eng.chat(req)
        assert eng.stats.prefix_hits == before.prefix_hits
        assert again.choices[0].response_ids == base.choices[0].response_ids
    finally:
        await eng.close()


async def test_engine_prefix_cache_stays_bounded():
    eng = TransformersEngine(
        tiny_model_dir(), model_name="tiny", dtype="float32", prefix_cache_tokens=600, prefix_cache_entries=3
    )
    try:
        for i in range(6):
            await eng.chat(_agent_req(f"Question {i}?", max_tokens=4))
            assert eng.prefix_cache is not None
            assert len(eng.prefix_cache) <= 3 and eng.prefix_cache.tokens <= 600
        assert eng.prefix_cache.evictions > 0
        await eng.set_prefix_cache(None)  # disabling between batches: no hits, nothing stored
        before = copy.copy(eng.stats)
        await eng.chat(_agent_req("Question 5?", max_tokens=4))
        assert eng.prefix_cache is None and eng.stats.prefix_hits == before.prefix_hits
    finally:
        await eng.close()


def test_prefix_cache_lru_supersede_and_views():
    from agentkiln.engine.embedded.prefix_cache import PrefixCache

    def kv(n: int, fill: float = 1.0):
        return [(torch.full((1, 2, n, 4), fill), torch.full((1, 2, n, 4), -fill))]

    cache = PrefixCache(max_tokens=10, max_entries=2)
    cache.insert([1, 2, 3], kv(3))
    cache.insert([1, 2, 3, 4, 5], kv(5))  # extends [1, 2, 3]: replaces it
    assert len(cache) == 1 and cache.tokens == 5
    cache.insert([1, 2], kv(2))  # covered: nothing added
    assert len(cache) == 1 and cache.covers([1, 2, 3])
    hit = cache.lookup([1, 2, 3, 9], limit=3)
    assert hit is not None and hit.length == 3 and hit.kv[0][0].shape == (1, 2, 3, 4)
    assert cache.lookup([1, 2, 3, 4, 5], limit=4).length == 4  # capped so one token is left to prefill
    assert cache.lookup([7, 1], limit=1) is None
    cache.insert([7, 8, 9], kv(3, 2.0))
    cache.lookup([1, 2], limit=1)  # touch: [1..5] becomes most recent
    cache.insert([6, 6, 6, 6], kv(4, 3.0))  # 12 tokens > 10: evicts the least recent ([7, 8, 9])
    assert cache.match_length([7, 8]) == 0 and cache.match_length([1, 2, 3]) == 3
    assert cache.tokens == 9 and cache.evictions == 1
    cache.insert(list(range(20)), kv(20))  # larger than the whole budget: not stored
    assert cache.tokens == 9
    cache.clear()
    assert len(cache) == 0 and cache.tokens == 0


async def test_token_text_names_each_token(engine):
    """Logprobs entries in the gateway carry each token's text, through the Engine interface."""
    res = await engine.chat(_req())
    ids = res.choices[0].response_ids
    assert "".join(engine.token_text(i) for i in ids) == engine.tokenizer.decode(ids)
    assert any(engine.token_text(i) for i in ids)
