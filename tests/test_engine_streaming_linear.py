"""Streaming decodes text incrementally: linear decode work, exact text, multi-byte characters intact."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from agentkiln.engine.base import ChatRequest
from agentkiln.engine.chat.template import StreamingVisibleText, visible_prefix
from agentkiln.engine.embedded import TransformersEngine
from agentkiln.engine.embedded.detokenizer import IncrementalDetokenizer
from agentkiln.engine.embedded.sampler import StopStringMatcher
from agentkiln.engine.model_files import load_tokenizer, tiny_model_dir

MULTIBYTE = [
    "Hello, world! café naïve — “quotes” …",
    "天气很好，我们去公园吧。東京は晴れです。서울 날씨",
    "emoji 🙂🎉👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math",
    "mixed: x² + y² = z² ∑∫√ ☃ ✓ ¿qué? Ελληνικά русский  spaces  \n\ttabs",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(tiny_model_dir())


class CountingDecode:
    """Wraps `tokenizer.decode` and counts the tokens it is asked to decode."""

    def __init__(self, tokenizer):
        self.inner = tokenizer.decode
        self.calls = 0
        self.tokens = 0

    def __call__(self, ids, *args, **kwargs):
        self.calls += 1
        self.tokens += len(ids)
        return self.inner(ids, *args, **kwargs)


@pytest.mark.parametrize("text", MULTIBYTE)
def test_incremental_detokenizer_equals_full_decode_on_multibyte(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    ids = [im_start] + ids[: len(ids) // 2] + [im_end] + ids[len(ids) // 2 :]  # specials are skipped
    detok = IncrementalDetokenizer(tok)
    for i, t in enumerate(ids):
        detok.add(t)
        full = tok.decode(ids[: i + 1], skip_special_tokens=True)
        assert "\ufffd" not in detok.text  # never half a character
        assert full.startswith(detok.text)
        assert detok.text + detok.pending == full
    assert detok.text == tok.decode(ids, skip_special_tokens=True) == text


def test_byte_tokens_of_one_character_wait_for_the_last_byte(tok):
    ids = tok("🎉", add_special_tokens=False)["input_ids"]
    byte_ids = [tok.convert_tokens_to_ids(t) for t in tok.convert_ids_to_tokens(ids)]
    detok = IncrementalDetokenizer(tok)
    out = [detok.add(t) for t in byte_ids]
    assert "".join(out) == "🎉" and out[-1] == "🎉" and all(o == "" for o in out[:-1])


def test_stop_string_matcher_equals_full_decode_check(tok):
    text = "".join(MULTIBYTE) * 2
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for stop in (["公园"], ["🎉", "zz"], ["ü", "qué?"], ["\n\t"], ["never there"]):
        matcher = StopStringMatcher(tok, stop)
        for i, t in enumerate(ids):
            expected = any(s in tok.decode(ids[: i + 1], skip_special_tokens=True) for s in stop)
            assert matcher.add(t) == expected, (stop, i)
            if expected:
                break


def _old_stream(raw_prefixes: list[str], markers: list[str]) -> list[str]:
    emitted, deltas = "", []
    for raw in raw_prefixes:
        visible = visible_prefix(raw, markers)
        delta = visible[len(emitted) :] if visible.startswith(emitted) else ""
        emitted += delta
        deltas.append(delta)
    return deltas


@pytest.mark.parametrize("markers", [[], ["<tool_call>"], ["END", "<tool_call>"], ["aab"]])
def test_streaming_visible_text_equals_rerunning_on_the_whole_text(markers):
    rng = random.Random(0)
    alphabet = ["a", "b", "E", "N", "D", "<", "tool", "_call", ">", " ", "x", "天"]
    for _ in range(200):
        chunks = [rng.choice(alphabet) for _ in range(rng.randint(1, 30))]
        prefixes = ["".join(chunks[: i + 1]) for i in range(len(chunks))]
        stream = StreamingVisibleText(markers)
        assert [stream.feed(c) for c in chunks] == _old_stream(prefixes, markers)


def test_stream_of_2000_tokens_decodes_linearly():
    threads = torch.get_num_threads()  # one intra-op thread: 2,000 tiny steps take seconds, not minutes, on busy CPUs
    engine = TransformersEngine(
        tiny_model_dir(), model_name="tiny", dtype="float32", prefix_cache_tokens=0, num_threads=1
    )
    engine._scheduler.stop_ids.clear()  # random weights may sample EOS early; we want 2,000 tokens
    counter = CountingDecode(engine.tokenizer)
    engine.tokenizer.decode = counter
    request = ChatRequest(
        messages=[{"role": "user", "content": "Write a long text."}], max_tokens=2000, temperature=1.0, seed=0
    )

    async def run():
        try:
            return [d async for d in engine.chat_stream(request)]
        finally:
            await engine.close()
            torch.set_num_threads(threads)

    deltas = asyncio.run(run())
    ids = [t for d in deltas for t in d.token_ids]
    assert len(ids) == 2000 and deltas[-1].final is not None
    per_token = counter.tokens / len(ids)
    assert per_token < 20, f"{per_token:.0f} tokens decoded per streamed token (quadratic re-decoding?)"
    full = counter.inner(ids, skip_special_tokens=True)
    streamed = "".join(d.text for d in deltas)
    assert streamed == full == deltas[-1].final.choices[0].text
    incremental = "".join(d.text for d in deltas[:-1])
    assert full.startswith(incremental) and len(full) - len(incremental) < 64  # not all left for the final delta
