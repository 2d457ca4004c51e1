"""Each gateway / embedded-engine limit answers its clear 4xx (or 503), against the real app and tiny engine.

Also: a disconnected client's generation stops, a failing sequence fails alone, and a large
prompt is templated off the event loop.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest

from agentkiln.engine.base import ChatRequest
from agentkiln.engine.embedded import scheduler as scheduler_mod
from agentkiln.gateway import limits
from tests.tiny_server import tiny_server

USER = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def tiny():
    with tiny_server() as served:
        served.http = httpx.Client(timeout=60)
        served.base = served.attempt_base()
        yield served
        served.http.close()


def chat(tiny, **body):
    body.setdefault("messages", USER)
    body.setdefault("max_tokens", 2)
    return tiny.http.post(f"{tiny.base}/chat/completions", json=body)


def responses(tiny, **body):
    body.setdefault("input", "Say something.")
    body.setdefault("max_output_tokens", 2)
    return tiny.http.post(f"{tiny.base}/responses", json=body)


def raw_chat(tiny, text: str) -> httpx.Response:
    return tiny.http.post(f"{tiny.base}/chat/completions", content=text, headers={"content-type": "application/json"})


def error(resp: httpx.Response, status: int = 400, contains: str = "") -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert contains.lower() in err["message"].lower(), err["message"]
    return err


def wait_until(cond, timeout: float = 30.0) -> bool:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


# --------------------------------------------------------------------------- stop strings


def test_too_many_stop_strings(tiny):
    err = error(chat(tiny, stop=[f"s{i}" for i in range(limits.MAX_STOP_STRINGS + 1)]), contains="stop strings")
    assert err["param"] == "stop"
    assert chat(tiny, stop=[f"s{i}" for i in range(limits.MAX_STOP_STRINGS)]).status_code == 200


def test_too_long_stop_string(tiny):
    error(chat(tiny, stop="x" * (limits.MAX_STOP_CHARS + 1)), contains=f"limit is {limits.MAX_STOP_CHARS}")
    assert chat(tiny, stop="x" * limits.MAX_STOP_CHARS).status_code == 200


def test_engine_contract_bounds_stop_too():
    with pytest.raises(ValueError, match="stop"):
        ChatRequest(messages=USER, stop=["x" * (limits.MAX_STOP_CHARS + 1)])


# --------------------------------------------------------------------------- prompt and generation size


def test_prompt_over_context_names_both_numbers(tiny):
    context = tiny.engine.max_context
    err = error(chat(tiny, messages=[{"role": "user", "content": "hello " * (context + 50)}]), contains="context")
    assert str(context) in err["message"] and "tokens" in err["message"]
    assert err["code"] == "invalid_request"


def test_huge_prompt_refused_before_tokenizing(tiny, monkeypatch):
    calls = []
    monkeypatch.setattr(tiny.engine.chat_template, "render", lambda *a, **k: calls.append(1))
    err = error(responses(tiny, input="word " * 200_000), contains=f"context is {tiny.engine.max_context}")
    assert "at least" in err["message"]
    assert calls == []  # refused from its length alone


def test_prompt_chars_bound(tiny):
    err = error(chat(tiny, messages=[{"role": "user", "content": "a" * (limits.MAX_PROMPT_CHARS + 1)}]))
    assert err["code"] == "prompt_too_long" and err["param"] == "messages"


def test_too_many_messages(tiny):
    err = error(chat(tiny, messages=USER * (limits.MAX_MESSAGES + 1)))
    assert err["param"] == "messages"
    error(responses(tiny, input=[{"role": "user", "content": "x"}] * (limits.MAX_MESSAGES + 1)))


def test_n_times_max_tokens_bounded(tiny):
    err = error(chat(tiny, n=64, max_tokens=2_000), contains="n x max_tokens")
    assert err["code"] == "too_many_tokens"


def test_max_tokens_bounded(tiny):
    error(chat(tiny, max_tokens=limits.MAX_TOKENS + 1))
    error(responses(tiny, max_output_tokens=10**30))


# --------------------------------------------------------------------------- numbers


def test_tiny_temperature_is_greedy(tiny):
    greedy = chat(tiny, temperature=0, max_tokens=6)
    tiny_t = chat(tiny, temperature=1e-45, max_tokens=6)  # logits / 1e-45 overflow to inf -> NaN
    assert greedy.status_code == tiny_t.status_code == 200, tiny_t.text
    assert tiny_t.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]


@pytest.mark.parametrize(
    "field,value",
    [
        ("seed", 2**63),
        ("seed", -(2**63) - 1),
        ("seed", 10**40),
        ("n", 10**30),
        ("top_logprobs", 10**19),
        ("max_completion_tokens", -(10**25)),
    ],
)
def test_out_of_range_integers(tiny, field, value):
    error(chat(tiny, **{field: value}))


def test_int64_seeds_are_served(tiny):
    for seed in (2**63 - 1, -(2**63), -1):
        assert chat(tiny, seed=seed, temperature=1.0).status_code == 200


@pytest.mark.parametrize(
    "bias",
    [
        {"abc": 1},
        {"5": 1000},
        {"-1": 1},
        {"99999999999": 1},
        {"²": 1},
        {str(i): 1 for i in range(limits.MAX_LOGIT_BIAS + 1)},
    ],
)
def test_logit_bias_bounded(tiny, bias):
    error(chat(tiny, logit_bias=bias), contains="logit_bias")


def test_logit_bias_in_range_is_accepted(tiny):
    assert chat(tiny, logit_bias={"5": -100, "7": 100.0}).status_code == 200


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "-1e400"])
def test_non_finite_numbers_anywhere(tiny, literal):
    for where in ('"temperature": {}', '"metadata": {{"x": [{}]}}', '"frequency_penalty": {}'):
        body = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, ' + where.format(literal) + "}"
        error(raw_chat(tiny, body), contains="finite")


def test_huge_integer_literal_anywhere(tiny):
    body = '{"messages": [{"role": "user", "content": "hi"}], "metadata": {"x": 1' + "0" * 5000 + "}}"
    error(raw_chat(tiny, body), contains="64 bits")


# --------------------------------------------------------------------------- JSON shape


@pytest.mark.parametrize("depth", [limits.MAX_JSON_DEPTH + 1, 5_000, 200_000])
def test_deep_nesting(tiny, depth):
    body = '{"messages": [{"role": "user", "content": "hi"}], "metadata": {"x": ' + "[" * depth + "]" * depth + "}}"
    error(raw_chat(tiny, body), contains="nested too deeply")


def test_moderate_nesting_is_fine(tiny):
    nested = "[" * 20 + "]" * 20
    body = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "metadata": {"x": ' + nested + "}}"
    assert raw_chat(tiny, body).status_code == 200


def test_lone_surrogate(tiny):
    body = '{"messages": [{"role": "user", "content": "hi \\ud800 there"}], "max_tokens": 2}'
    error(raw_chat(tiny, body), contains="surrogate")
    ok = '{"messages": [{"role": "user", "content": "hi \\ud83d\\ude00"}], "max_tokens": 2}'  # a pair is fine
    assert raw_chat(tiny, ok).status_code == 200


# --------------------------------------------------------------------------- engine queue


def test_queue_bound_answers_503_with_retry_after(tiny, monkeypatch):
    sched = tiny.engine._scheduler
    monkeypatch.setattr(sched, "max_waiting", 2)
    release, blocked = threading.Event(), threading.Event()

    def hold() -> None:  # a task: the scheduler thread admits nothing until it returns
        blocked.set()
        release.wait(60)

    sched.add_task((hold, lambda exc: None))
    assert blocked.wait(30)
    answers: list[int] = []
    waiters = [threading.Thread(target=lambda: answers.append(chat(tiny).status_code)) for _ in range(2)]
    try:
        for t in waiters:
            t.start()
        assert wait_until(lambda: tiny.engine.waiting == 2)
        over = chat(tiny)
        err = error(over, 503, contains="overloaded")
        assert err["code"] == "engine_unavailable"
        assert int(over.headers["retry-after"]) >= 1
    finally:
        release.set()
        for t in waiters:
            t.join(60)
    assert answers == [200, 200]


# --------------------------------------------------------------------------- client disconnects


def _long_request(tiny, stream: bool) -> socket.socket:
    """Send a long generation by hand on a raw socket (so the test decides when the client goes away)."""
    url = urlsplit(tiny.base)
    body = httpx.Request("POST", "http://x", json={"messages": USER, "max_tokens": 4000, "stream": stream}).content
    head = (
        f"POST {url.path}/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock = socket.create_connection((url.hostname, url.port), timeout=60)
    sock.sendall(head.encode() + body)
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_cancels_generation(tiny, stream):
    engine = tiny.engine
    before = engine.stats.tokens
    sock = _long_request(tiny, stream)
    try:
        assert wait_until(lambda: engine.running == 1 and engine.stats.tokens > before + 3)
        if stream:
            assert b"data: " in sock.recv(65536)  # it really is streaming
    finally:
        sock.close()
    assert wait_until(lambda: engine.running == 0, timeout=10), "generation went on after the client left"
    generated = engine.stats.tokens - before
    assert generated < 1500, generated  # far from the ~2000 tokens the context allowed
    assert chat(tiny).status_code == 200  # and the engine keeps serving


# --------------------------------------------------------------------------- a bad sequence fails alone


def test_failing_sequence_fails_alone(tiny, monkeypatch):
    real = scheduler_mod.sample
    calls = {"bad": 0}

    def flaky(logits, temperature, top_p, gen):
        if temperature == 0.777:  # the bad request: fails on its third token, mid-batch
            calls["bad"] += 1
            if calls["bad"] >= 3:
                raise RuntimeError("sampling exploded")
        return real(logits, temperature, top_p, gen)

    monkeypatch.setattr(scheduler_mod, "sample", flaky)
    engine = tiny.engine
    good_req = ChatRequest(messages=USER, max_tokens=12, temperature=0.0)
    bad_req = ChatRequest(messages=USER, max_tokens=12, temperature=0.777)

    async def both():
        return await asyncio.gather(
            engine.chat(good_req), engine.chat(bad_req), engine.chat(good_req), return_exceptions=True
        )

    max_active = engine.stats.max_active
    engine.stats.max_active = 0
    try:
        good, bad, good2 = asyncio.run(both())  # the engine serves callers on any loop
        assert engine.stats.max_active >= 2  # they were decoded in one batch
    finally:
        engine.stats.max_active = max(max_active, engine.stats.max_active)
    assert isinstance(bad, Exception) and "sampling exploded" in str(bad)
    assert not isinstance(good, Exception) and not isinstance(good2, Exception)
    assert len(good.choices[0].response_ids) == len(good2.choices[0].response_ids) > 3
    calls["bad"] = 0
    error(chat(tiny, temperature=0.777, max_tokens=8), 502, contains="sampling exploded")


# --------------------------------------------------------------------------- tokenizing off the loop


def test_large_prompt_is_rendered_off_the_event_loop(tiny, monkeypatch):
    seen = []
    real = tiny.engine.chat_template.render

    def render(messages, tools=None):
        try:
            asyncio.get_running_loop()
            seen.append("event loop")
        except RuntimeError:
            seen.append(threading.current_thread().name.split("_")[0])
        return real(messages, tools)

    monkeypatch.setattr(tiny.engine.chat_template, "render", render)
    assert chat(tiny).status_code == 200
    assert chat(tiny, messages=[{"role": "user", "content": "word " * 1700}]).status_code == 200
    assert seen == ["event loop", "kiln-render"]  # small prompts skip the thread hop


def test_disconnect_watch_cancels_work_and_ignores_unwatchable_connections():
    from agentkiln.gateway.call import unless_disconnected
    from agentkiln.gateway.errors import GatewayError

    class Gone:
        async def receive(self):
            return {"type": "http.disconnect"}

    class Unwatchable:
        async def receive(self):
            raise RuntimeError("this server cannot say")

    cancelled = []

    async def work():
        try:
            await asyncio.sleep(0.2)
            return 7
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    with pytest.raises(GatewayError) as err:
        asyncio.run(unless_disconnected(Gone(), work()))
    assert err.value.status_code == 499 and cancelled == [True]
    assert asyncio.run(unless_disconnected(Unwatchable(), work())) == 7
