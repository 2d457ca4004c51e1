"""How the gateway writes event streams: a finished answer in one plain response, a live one chunked.

An answer the engine already finished (a fast upstream's whole stream arrived in one read)
gains nothing from chunked streaming; sending it as one body is most of what streaming
costs the gateway. A live stream must still reach the client delta by delta.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from agentkiln.store import InMemoryStore
from tests.gateway_fakes import ScriptedEngine, ServedApp, gateway_app

REPLY = "Streaming answers arrive in pieces."


def _events(raw: str) -> list[dict]:
    return [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]


@pytest.mark.parametrize("chunk_chars", [0, 3])
def test_chat_stream_framing(chunk_chars: int) -> None:
    engine = ScriptedEngine([REPLY] * 4, stream_chunk_chars=chunk_chars)
    with ServedApp(gateway_app(InMemoryStore(), engine)) as srv:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body) as r:
            raw = r.read().decode()
            headers = r.headers
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x")
        sdk_text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(model="m", messages=body["messages"], stream=True)
            if c.choices
        )
    assert headers["content-type"].startswith("text/event-stream")
    if chunk_chars == 0:  # finished before the first byte: one body with a length
        assert headers.get("content-length") == str(len(raw.encode()))
    else:  # live: chunked, one piece per delta
        assert headers.get("transfer-encoding") == "chunked" and "content-length" not in headers
    events = _events(raw)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == REPLY
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "stop"
    assert events[-1]["usage"]["completion_tokens"] == len(REPLY)
    assert raw.endswith("data: [DONE]\n\n") and sdk_text == REPLY


@pytest.mark.parametrize("chunk_chars", [0, 3])
def test_responses_stream_framing(chunk_chars: int) -> None:
    engine = ScriptedEngine([REPLY] * 2, stream_chunk_chars=chunk_chars)
    with ServedApp(gateway_app(InMemoryStore(), engine)) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x")
        events = list(client.responses.create(model="m", input="hi", stream=True))
        with httpx.stream("POST", f"{srv.url}/v1/responses", json={"model": "m", "input": "hi", "stream": True}) as r:
            r.read()
            chunked = r.headers.get("transfer-encoding") == "chunked"
    assert chunked == (chunk_chars > 0)
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == REPLY
    assert events[-1].response.output_text == REPLY
    assert [e.sequence_number for e in events] == list(range(len(events)))
