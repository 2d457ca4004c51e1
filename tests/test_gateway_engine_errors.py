"""Engine errors reach clients by the engine error family, on both APIs, streamed or not.

An `EngineError` answers its own status and code (503 + Retry-After for `EngineUnavailable`, so
SDKs back off and retry); a timeout or broken connection escaping an engine is a 503 too; any
other exception is a 502. Every failure still leaves an LLM-error span on the attempt.
"""

from __future__ import annotations

import json

import httpx
import pytest

from agentkiln.engine.errors import EngineError, EngineRequestError, EngineResponseError, EngineUnavailable
from agentkiln.models import FailureKind
from agentkiln.protocol import SpanAttrs, SpanNames
from agentkiln.store.memory import InMemoryStore
from tests.gateway_fakes import ScriptedEngine, ServedApp, gateway_app

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
RESPONSES_TOOLS = [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}]

# (raised by the engine, status, code, type, Retry-After)
CASES = [
    (EngineUnavailable("engine busy", retry_after_s=2.2), 503, "engine_unavailable", "server_error", "3"),
    (EngineUnavailable("upstream 429", upstream_status=429), 503, "engine_unavailable", "server_error", "1"),
    (EngineRequestError("prompt longer than the context"), 400, "invalid_request", "invalid_request_error", None),
    (EngineResponseError("upstream sent no choices"), 502, "engine_error", "server_error", None),
    (EngineError("engine refused"), 502, "engine_error", "server_error", None),
    (TimeoutError("upstream timed out"), 503, "engine_unavailable", "server_error", "1"),
    (ConnectionError("connection refused"), 503, "engine_unavailable", "server_error", "1"),
    (ValueError("engine bug"), 502, "engine_error", "server_error", None),
]
IDS = [f"{type(c[0]).__name__}-{c[1]}-{c[4]}" for c in CASES]


@pytest.fixture(scope="module")
def served():
    store = InMemoryStore(sweep_interval_s=None)
    engine = ScriptedEngine(["a reply long enough to be streamed in several pieces"])
    with ServedApp(gateway_app(store, engine)) as srv, httpx.Client(timeout=10) as http:
        srv.store, srv.engine, srv.http = store, engine, http
        yield srv


@pytest.fixture
def env(served):
    """A fresh running attempt per test, and an engine that works again afterwards."""
    ar = served.call(served.store.start_rollout({"task": "errors"}))
    served.rid, served.aid = ar.rollout.rollout_id, ar.attempt.attempt_id
    served.base = f"{served.url}/rollout/{served.rid}/attempt/{served.aid}/v1"
    yield served
    served.engine.fail_with = None
    served.engine.fail_stream_after = served.engine.fail_stream_with = None


def _request(api: str, mode: str) -> tuple[str, dict]:
    """mode: whole answer, live stream, or a stream the gateway sends once finished (tools)."""
    if api == "chat":
        path, body = "/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    else:
        path, body = "/responses", {"model": "m", "input": "hi"}
    if mode != "whole":
        body["stream"] = True
    if mode == "finished-stream":
        body["tools"] = TOOLS if api == "chat" else RESPONSES_TOOLS
    return path, body


def _error_span(env, exc: BaseException) -> None:
    (span,) = env.call(env.store.query_spans(env.rid, name=SpanNames.llm_call))
    assert span.status.code == "ERROR"
    assert span.attributes[SpanAttrs.failure_kind] == FailureKind.llm_error.value
    assert span.attributes[SpanAttrs.exception_type] == type(exc).__name__


@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize("mode", ["whole", "live-stream", "finished-stream"])
@pytest.mark.parametrize("exc, status, code, type_, retry_after", CASES, ids=IDS)
def test_engine_error_status_body_and_retry_after(env, api, mode, exc, status, code, type_, retry_after):
    env.engine.fail_with = exc
    path, body = _request(api, mode)
    resp = env.http.post(env.base + path, json=body)
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")  # failed before the stream opened
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["type"] == type_ and str(exc) in err["message"]
    assert resp.headers.get("retry-after") == retry_after
    _error_span(env, exc)


@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize("exc, code", [(EngineUnavailable("engine overloaded"), "engine_unavailable"),
                                       (EngineRequestError("context full"), "invalid_request"),
                                       (KeyError("bug"), "engine_error")])  # fmt: skip
def test_mid_stream_engine_error_is_an_error_event(env, api, exc, code):
    """Once the stream is open the status is sent; the error goes out as the stream's last event(s)."""
    env.engine.fail_stream_after, env.engine.fail_stream_with = 2, exc
    path, body = _request(api, "live-stream")
    with env.http.stream("POST", env.base + path, json=body) as resp:
        raw = resp.read().decode()
    assert resp.status_code == 200 and "retry-after" not in resp.headers
    events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    if api == "chat":
        error = events[-1]["error"]
        assert "[DONE]" not in raw
    else:
        assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
        error = events[-2]
        assert events[-1]["response"]["error"]["code"] == code
    assert error["code"] == code and str(exc) in error["message"]
    _error_span(env, exc)
