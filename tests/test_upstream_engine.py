"""UpstreamEngine against a fake OpenAI-compatible server (httpx.MockTransport)."""

from __future__ import annotations

import json
import math

import httpx
import pytest

from agentkiln.engine.base import ChatRequest
from agentkiln.engine.factory import build_engine
from agentkiln.engine.model_files import load_tokenizer, tiny_model_dir
from agentkiln.engine.upstream import UpstreamEngine

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


def _completion(with_ids: bool) -> dict:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": "Paris is the capital."},
        "finish_reason": "stop",
        "logprobs": {"content": [{"token": t, "logprob": -0.5} for t in ("Paris", " is", " the", " capital", ".")]},
    }
    data = {"id": "x", "object": "chat.completion", "model": "m", "choices": [choice]}
    if with_ids:
        choice["token_ids"] = [10, 11, 12, 13, 14]
        data["prompt_token_ids"] = [1, 2, 3]
    return data


def _stream_chunks() -> list[dict]:
    base = {"id": "x", "object": "chat.completion.chunk", "model": "m"}
    return [
        {
            **base,
            "prompt_token_ids": [1, 2, 3],
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
        },
        {
            **base,
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": "Hi"},
                    "token_ids": [7],
                    "logprobs": {"content": [{"token": "Hi", "logprob": -0.1}]},
                }
            ],
        },
        {
            **base,
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_9",
                                "type": "function",
                                "function": {"name": "add", "arguments": '{"a": '},
                            }
                        ]
                    },
                    "token_ids": [8],
                    "logprobs": {"content": [{"token": "x", "logprob": -0.2}]},
                }
            ],
        },
        {
            **base,
            "choices": [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]},
                    "token_ids": [9],
                    "logprobs": {"content": [{"token": "y", "logprob": -0.3}]},
                    "finish_reason": "tool_calls",
                }
            ],
        },
    ]


class _ByteChunks(httpx.AsyncByteStream):
    """A body that arrives in separate reads, one per part."""

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts

    async def __aiter__(self):
        for part in self.parts:
            yield part


def _server(seen: list[dict], with_ids: bool = True, one_read: bool = True) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/chat/completions"
        assert request.headers["authorization"] == "Bearer sk-test"
        body = json.loads(request.content)
        seen.append(body)
        if body.get("stream"):
            events = [f"data: {json.dumps(c)}\n\n".encode() for c in _stream_chunks()] + [b"data: [DONE]\n\n"]
            headers = {"content-type": "text/event-stream"}
            if one_read:
                return httpx.Response(200, content=b"".join(events), headers=headers)
            return httpx.Response(200, stream=_ByteChunks(events), headers=headers)
        return httpx.Response(200, json=_completion(with_ids))

    return httpx.MockTransport(handler)


def _engine(seen: list[dict], with_ids: bool = True, tokenizer=None, one_read: bool = True) -> UpstreamEngine:
    return UpstreamEngine(
        "http://fake/v1",
        model="m",
        api_key="sk-test",
        tokenizer=tokenizer,
        transport=_server(seen, with_ids, one_read),
    )


async def test_chat_uses_returned_token_ids():
    seen: list[dict] = []
    eng = _engine(seen)
    res = await eng.chat(ChatRequest(messages=[{"role": "user", "content": "Capital of France?"}], seed=5, stop=["\n"]))
    await eng.close()
    body = seen[0]
    assert body["logprobs"] is True and body["return_token_ids"] is True
    assert body["seed"] == 5 and body["stop"] == ["\n"] and body["model"] == "m"
    assert res.prompt_ids == [1, 2, 3]
    choice = res.choices[0]
    assert choice.response_ids == [10, 11, 12, 13, 14] and choice.logprobs == [-0.5] * 5
    assert choice.text == "Paris is the capital." and choice.finish_reason == "stop"


async def test_chat_without_ids_tokenizes_locally():
    tok = load_tokenizer(tiny_model_dir())
    eng = _engine([], with_ids=False, tokenizer=tok)
    req = ChatRequest(messages=[{"role": "user", "content": "Capital of France?"}])
    res = await eng.chat(req)
    await eng.close()
    assert res.prompt_text and res.prompt_ids == tok(res.prompt_text, add_special_tokens=False)["input_ids"]
    choice = res.choices[0]
    assert choice.response_ids == tok("Paris is the capital.", add_special_tokens=False)["input_ids"]
    # 5 server logprobs cannot be aligned with a different number of local ids: dropped, not misaligned
    assert len(choice.logprobs) in (0, len(choice.response_ids))
    assert "".join(eng.token_text(i) for i in choice.response_ids) == "Paris is the capital."


@pytest.mark.parametrize("one_read", [False, True])
async def test_stream_forwards_deltas_and_tool_calls(one_read: bool):
    seen: list[dict] = []
    eng = _engine(seen, one_read=one_read)
    req = ChatRequest(messages=[{"role": "user", "content": "1+0?"}], tools=TOOLS)
    deltas = [d async for d in eng.chat_stream(req)]
    await eng.close()
    assert seen[0]["stream"] is True and seen[0]["tools"] == TOOLS
    if one_read:  # what arrived in one read is one delta, the final one
        assert len(deltas) == 1 and deltas[0].text == "Hi"
    else:  # one delta per read that carried tokens
        assert [d.text for d in deltas[:-1]] == ["Hi", "", ""] and deltas[-1].text == ""
    assert [t for d in deltas for t in d.token_ids] == [7, 8, 9]
    final = deltas[-1].final
    assert final is not None and final.prompt_ids == [1, 2, 3]
    choice = final.choices[0]
    assert choice.response_ids == [7, 8, 9] and choice.logprobs == [-0.1, -0.2, -0.3]
    assert choice.finish_reason == "tool_calls"
    assert [(c.id, c.name, json.loads(c.arguments)) for c in choice.tool_calls] == [("call_9", "add", {"a": 1})]


def test_factory_specs(monkeypatch):
    assert build_engine("none") is None
    monkeypatch.setenv("KILN_UPSTREAM_API_KEY", "k")
    eng = build_engine("upstream:http://host:8000/v1#qwen")
    assert isinstance(eng, UpstreamEngine) and eng.base_url == "http://host:8000/v1" and eng.model_name == "qwen"
    with pytest.raises(ValueError):
        build_engine("no-such-thing")


async def test_factory_builds_embedded_engines():
    from agentkiln.engine.embedded import TransformersEngine

    for spec in ("tiny", str(tiny_model_dir())):
        eng = build_engine(spec, max_batch_size=2)
        assert isinstance(eng, TransformersEngine) and eng.max_batch_size == 2
        await eng.close()


def test_upstream_json_with_infinity_still_parses():
    """Some servers write -Infinity for a logprob: orjson refuses it, the stdlib fallback keeps it."""
    from agentkiln.engine.upstream.transport import loads

    assert loads(b'{"logprob": -Infinity, "ids": [1, 2]}') == {"logprob": float("-inf"), "ids": [1, 2]}
    assert loads(b'{"ok": true}') == {"ok": True}
    assert math.isnan(loads(b'{"logprob": NaN}')["logprob"])
