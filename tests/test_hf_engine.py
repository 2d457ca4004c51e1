"""Embedded transformers engine on the tiny random model (fast) plus one real-model check (slow)."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from agentkiln.engine.base import ChatRequest
from agentkiln.engine.hf_engine import TransformersEngine
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
