"""Property-based fuzzing of /v1/chat/completions and /v1/responses against the real app and tiny engine.

Mutations of valid bodies (wrong types, huge / negative integers, inf / NaN, deep nesting,
unicode and lone surrogates, huge stop lists and prompts, unknown fields, truncated JSON), sent
to the plain, the per-attempt (recorded) and the per-agent routes, streamed or not. The property: no answer is a 5xx (nor
a 200 whose stream carries a server error), and a well-formed request sent in a loop alongside
keeps answering 200 with bounded latency.
"""

from __future__ import annotations

import json
import statistics
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.tiny_server import tiny_server

GOOD_LATENCY_BOUND_S = 20.0  # generous: the test machines are small and shared; a stalled loop takes minutes

HOSTILE_INTS = st.sampled_from([2**63, 2**63 - 1, -(2**63), -(2**63) - 1, 2**64, 10**30, -(10**30), 0, -1, 2**31])
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1e-45, 5e-324, 1e308, -0.0, 1e-6])
TEXT = st.text(max_size=40) | st.sampled_from(["\ud800", "a\udfffb", "\x00", "\u202e\u2066", "🙂" * 20, "<|im_end|>"])
LEAF = st.none() | st.booleans() | HOSTILE_INTS | st.integers() | FLOATS | TEXT
JSON_VALUES = st.recursive(
    LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=12
)
SMALL_TOKENS = st.integers(min_value=1, max_value=3)
# Size fields get hostile values or small valid ones only: a valid 30,000-token request is load, not an attack.
SIZE_VALUES = HOSTILE_INTS.filter(lambda v: v <= 0 or v > 65_536) | SMALL_TOKENS | FLOATS | TEXT | st.none()

CHAT_FIELDS = ["model", "messages", "tools", "tool_choice", "n", "temperature", "top_p", "stop", "logprobs",
               "top_logprobs", "stream", "stream_options", "seed", "user", "metadata", "logit_bias", "functions",
               "frequency_penalty", "presence_penalty", "return_token_ids", "parallel_tool_calls"]  # fmt: skip
RESPONSES_FIELDS = ["model", "input", "instructions", "tools", "tool_choice", "temperature", "top_p", "stream",
                    "include", "metadata", "user", "top_logprobs", "previous_response_id", "conversation"]  # fmt: skip
TOOL = {"type": "function", "function": {"name": "calc", "parameters": {"type": "object", "properties": {}}}}


def chat_body() -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 2}


def responses_body() -> dict:
    return {"model": "tiny", "input": [{"role": "user", "content": "Say something."}], "max_output_tokens": 2}


@st.composite
def mutated(draw) -> tuple[str, bytes]:
    """(API path suffix, body bytes): a valid body with a few hostile mutations."""
    api = draw(st.sampled_from(["chat/completions", "responses"]))
    body = chat_body() if api == "chat/completions" else responses_body()
    fields = CHAT_FIELDS if api == "chat/completions" else RESPONSES_FIELDS
    size_field = "max_tokens" if api == "chat/completions" else "max_output_tokens"
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["field", "field", "size", "stop", "message", "prompt", "unknown", "tools"]))
        if kind == "field":
            body[draw(st.sampled_from(fields))] = draw(JSON_VALUES)
        elif kind == "size":
            body[draw(st.sampled_from([size_field, "n", "max_completion_tokens"]))] = draw(SIZE_VALUES)
        elif kind == "stop":
            count = draw(st.sampled_from([1, 4, 16, 17, 500, 3_000]))
            length = draw(st.sampled_from([1, 50, 256, 257, 2_000]))
            body["stop"] = [draw(TEXT) + "x" * length for _ in range(min(count, 3))] * max(1, count // 3)
        elif kind == "message":
            msgs = body.get("messages") or body.get("input")
            if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict):
                msgs[0][draw(st.sampled_from(["role", "content", "name", "tool_calls", "type", "x"]))] = draw(
                    JSON_VALUES
                )
        elif kind == "prompt":
            reps, count = draw(st.sampled_from([(1, 1), (1_000, 1), (20_000, 1), (1, 3_000), (10, 2_100)]))
            text = draw(TEXT) * reps or "x" * (400_000 // count)  # at most ~800,000 characters in all
            key = "messages" if api == "chat/completions" else "input"
            body[key] = [{"role": "user", "content": text}] * count
        elif kind == "unknown":
            body[draw(TEXT)] = draw(JSON_VALUES)
        else:
            body["tools"] = [TOOL, draw(JSON_VALUES)] if draw(st.booleans()) else [TOOL] * 3
    raw = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    shape = draw(st.sampled_from(["plain", "plain", "plain", "deep", "truncated", "byte"]))
    if shape == "deep":
        depth = draw(st.sampled_from([65, 1_000, 100_000]))
        raw = raw[:-1] + b', "metadata": {"x": ' + b"[" * depth + b"]" * depth + b"}}"
    elif shape == "truncated":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif shape == "byte":
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1 :]
    return api, raw


@pytest.fixture(scope="module")
def served():
    with tiny_server() as tiny:
        attempt = tiny.attempt_base()
        tiny.bases = [f"{tiny.url}/v1", attempt, attempt.replace("/v1", "/agent/fuzzer/v1")]
        tiny.http = httpx.Client(timeout=60)
        yield tiny
        tiny.http.close()


class GoodTraffic:
    """A well-formed request in a loop on its own connection, timing every answer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.results: list[tuple[int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=120) as http:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                status = http.post(self.url, json=chat_body()).status_code
                self.results.append((status, time.perf_counter() - t0))
                self._stop.wait(0.05)

    def __enter__(self) -> GoodTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(150)


@pytest.fixture(scope="module")
def good(served):
    with GoodTraffic(f"{served.url}/v1/chat/completions") as traffic:
        yield traffic


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(case=mutated(), route=st.integers(0, 2))
def test_no_5xx_under_mutated_bodies(served, good, case, route):
    api, raw = case
    resp = served.http.post(f"{served.bases[route]}/{api}", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code < 500, (resp.status_code, resp.text[:500], raw[:300])
    if resp.status_code >= 400:
        assert set(resp.json()["error"]) >= {"message", "type"}
    else:
        assert "server_error" not in resp.text, resp.text[:500]  # a stream that failed after its 200


def test_good_traffic_kept_answering(served, good):
    """Runs after the fuzzer (same module-scoped traffic): every well-formed request got its 200, in time."""
    deadline = time.monotonic() + 30
    while len(good.results) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    statuses = [s for s, _ in good.results]
    latencies = [t for _, t in good.results]
    assert statuses and set(statuses) == {200}, statuses
    assert max(latencies) < GOOD_LATENCY_BOUND_S, (max(latencies), statistics.median(latencies))
