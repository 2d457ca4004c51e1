"""Production capture on plain /v1: sessions, sampling, opt-out, redaction, the version that served."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from agentkiln.engine.base import ChatChoice, ChatResult
from agentkiln.models import RolloutMode
from agentkiln.production.capture import CaptureConfig, ProductionCapture
from agentkiln.production.redaction import REPLACEMENT, Redactor
from agentkiln.production.sessions import SessionIdError, SessionResolver
from agentkiln.protocol import SESSION_ATTEMPT_ID, Headers, LLMCall, SpanAttrs, session_rollout_id
from agentkiln.server.app import create_app
from agentkiln.store.memory import InMemoryStore
from tests.gateway_fakes import ScriptedEngine, ServedApp


def _result(text: str, tool_calls: Any = ()) -> ChatResult:
    choice = ChatChoice(text=text, raw_text=text, tool_calls=list(tool_calls), response_ids=[1], logprobs=[-0.1])
    return ChatResult(prompt_ids=[1], choices=[choice], model="m", model_version="v1")


# --------------------------------------------------------------------------- sessions


def test_session_comes_from_header_then_metadata_then_history_then_user() -> None:
    r = SessionResolver()
    msgs = [{"role": "user", "content": "hi"}]
    assert r.resolve({Headers.session: "s-1"}, {"session_id": "other"}, "u", msgs) == ("s-1", "header")
    assert r.resolve({}, {"session_id": "s-2"}, "u", msgs) == ("s-2", "metadata")
    assert r.resolve({}, None, "alice", msgs) == ("user:alice", "user")
    sid, how = r.resolve({}, None, None, msgs)
    assert how == "new" and sid.startswith("auto:")
    with pytest.raises(SessionIdError):
        r.resolve({Headers.session: "has spaces and /slashes"}, None, None, msgs)


def test_a_conversation_that_continues_an_answer_stays_in_its_session() -> None:
    r = SessionResolver()
    first = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    sid, _ = r.resolve({}, None, None, first)
    r.remember(sid, first, _result("4"))
    # The client resends the history with the answer, spelled its own way (content parts), plus a new turn.
    second = first + [
        {"role": "assistant", "content": [{"type": "text", "text": "4"}]},
        {"role": "user", "content": "and 3+3?"},
    ]
    assert r.resolve({}, None, None, second) == (sid, "continued")
    # A different conversation with the same opening is a new session.
    other = first + [{"role": "assistant", "content": "5"}, {"role": "user", "content": "sure?"}]
    assert r.resolve({}, None, None, other)[0] != sid


def test_tool_call_answers_are_matched_whatever_the_argument_spelling() -> None:
    from agentkiln.engine.base import ToolCall

    r = SessionResolver()
    first = [{"role": "user", "content": "weather?"}]
    r.remember("s", first, _result("", [ToolCall(id="c1", name="get", arguments='{"city": "Oslo", "u": 1}')]))
    resent = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "x", "type": "function", "function": {"name": "get", "arguments": '{"u":1,"city":"Oslo"}'}}],
    }
    second = first + [resent, {"role": "tool", "tool_call_id": "x", "content": "sunny"}]
    assert r.resolve({}, None, None, second) == ("s", "continued")


def test_sampling_is_per_session_and_near_its_rate() -> None:
    capture = ProductionCapture(CaptureConfig(enabled=True, sample_rate=0.3))
    picks = [capture.sampled(f"s{i}") for i in range(4000)]
    assert 0.26 < sum(picks) / len(picks) < 0.34
    assert all(capture.sampled(f"s{i}") == picks[i] for i in range(200))  # sticky
    with pytest.raises(ValueError):
        CaptureConfig(sample_rate=1.5)


# --------------------------------------------------------------------------- redaction


def test_redactor_rewrites_every_string_and_drops_token_ids_when_text_changed() -> None:
    redactor = Redactor.build(["email", "api_key", "re:ACCT-\\d+"])
    attrs = {
        SpanAttrs.request: {"messages": [{"role": "user", "content": "mail bob@example.com, key sk-abcdefghijklmnop1234"}]},
        SpanAttrs.response: {"choices": [{"message": {"content": "noted ACCT-991"}}]},
        SpanAttrs.prompt_token_ids: [1, 2],
        SpanAttrs.response_token_ids: [3],
        SpanAttrs.response_logprobs: [-0.1],
    }
    out = redactor.attributes(attrs)
    text = str(out)
    assert "bob@example.com" not in text and "sk-abcdefghijklmnop1234" not in text and "ACCT-991" not in text
    assert text.count(REPLACEMENT) == 3
    assert out[SpanAttrs.redacted] is True
    assert SpanAttrs.prompt_token_ids not in out and SpanAttrs.response_logprobs not in out
    clean = {SpanAttrs.request: {"messages": [{"role": "user", "content": "2+2"}]}, SpanAttrs.prompt_token_ids: [1]}
    assert redactor.attributes(clean) == clean  # nothing to redact: the call stays trainable


def test_redaction_hook_and_bad_settings() -> None:
    redactor = Redactor.build([], hook="tests.test_production_capture:upper_hook")
    assert redactor.text("abc") == "ABC"
    with pytest.raises(ValueError):
        Redactor.build(["no-such-pattern"])
    with pytest.raises(ValueError):
        Redactor.build([], hook="no_colon")


def upper_hook(text: str) -> str:
    return text.upper()


# --------------------------------------------------------------------------- through the gateway


def _served(capture: CaptureConfig, script: Any = ("4",)) -> tuple[ServedApp, InMemoryStore]:
    store = InMemoryStore(sweep_interval_s=None)
    app = create_app(store, sweep_interval_s=0, engine=ScriptedEngine(script), model_sync_interval_s=0, capture=capture)
    return ServedApp(app), store


def _chat(url: str, messages: list[dict[str, Any]], headers: dict[str, str] | None = None, **body: Any) -> dict:
    resp = httpx.post(f"{url}/v1/chat/completions", json={"model": "gpt-4.1", "messages": messages, **body},
                      headers=headers or {}, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _calls(served: ServedApp, store: InMemoryStore, session_id: str) -> list[LLMCall]:
    spans = served.call(store.query_spans(session_rollout_id(session_id)))
    return [LLMCall.from_span(s) for s in spans]


def test_plain_v1_calls_are_recorded_on_their_session_with_token_ids_and_version() -> None:
    served, store = _served(CaptureConfig(enabled=True))
    with served:
        body = _chat(served.url, [{"role": "user", "content": "2+2?"}], {Headers.session: "chat-7"})
        _chat(served.url, [{"role": "user", "content": "3+3?"}], {Headers.session: "chat-7"}, stream=False)
        rollout = served.call(store.get_rollout(session_rollout_id("chat-7")))
        assert rollout.mode == RolloutMode.production and rollout.input == {"session_id": "chat-7"}
        calls = _calls(served, store, "chat-7")
        assert len(calls) == 2
        assert calls[0].call_id == body["id"] and calls[0].session_id == "chat-7"
        assert calls[0].prompt_ids and calls[0].response_ids and calls[0].logprobs
        assert calls[0].model_version == "v1"
        spans = served.call(store.query_spans(session_rollout_id("chat-7")))
        assert {s.attempt_id for s in spans} == {SESSION_ATTEMPT_ID}


def test_streaming_and_responses_calls_are_captured_and_history_links_them() -> None:
    served, store = _served(CaptureConfig(enabled=True))
    with served:
        first = [{"role": "user", "content": "2+2?"}]
        with httpx.stream("POST", f"{served.url}/v1/chat/completions",
                          json={"model": "m", "messages": first, "stream": True}, timeout=30) as resp:
            assert resp.status_code == 200
            "".join(resp.iter_text())
        rollouts = served.call(store.query_rollouts(mode=RolloutMode.production))
        assert len(rollouts) == 1
        session_id = rollouts[0].input["session_id"]
        # The next turn resends the answer: same session, no header needed.
        _chat(served.url, first + [{"role": "assistant", "content": "4"}, {"role": "user", "content": "sure?"}])
        resp = httpx.post(f"{served.url}/v1/responses", json={"model": "m", "input": "hello"},
                          headers={Headers.session: session_id}, timeout=30)
        assert resp.status_code == 200, resp.text
        calls = _calls(served, store, session_id)
        assert [c.api for c in calls] == ["chat.completions", "chat.completions", "responses"]
        assert calls[0].stream and calls[0].response_ids
        assert len(served.call(store.query_rollouts(mode=RolloutMode.production))) == 1


def test_opt_out_header_sampling_and_capture_off_record_nothing() -> None:
    served, store = _served(CaptureConfig(enabled=True, sample_rate=0.0))
    with served:
        _chat(served.url, [{"role": "user", "content": "x"}], {Headers.session: "s"})
        assert served.call(store.query_rollouts(mode=RolloutMode.production)) == []
    served, store = _served(CaptureConfig(enabled=True))
    with served:
        _chat(served.url, [{"role": "user", "content": "x"}], {Headers.session: "s", Headers.capture: "off"})
        assert served.call(store.query_rollouts(mode=RolloutMode.production)) == []
        _chat(served.url, [{"role": "user", "content": "x"}], {Headers.session: "s"})
        assert len(served.call(store.query_rollouts(mode=RolloutMode.production))) == 1
    served, store = _served(CaptureConfig(enabled=False))
    with served:
        _chat(served.url, [{"role": "user", "content": "x"}], {Headers.session: "s"})
        assert served.call(store.query_rollouts()) == []


def test_redaction_runs_before_the_store_sees_the_call() -> None:
    served, store = _served(CaptureConfig(enabled=True, redact=("email",)), script=("write to ann@corp.io",))
    with served:
        _chat(served.url, [{"role": "user", "content": "I am bob@example.com"}], {Headers.session: "r"})
        spans = served.call(store.query_spans(session_rollout_id("r")))
        stored = str([s.attributes for s in spans])
        assert "bob@example.com" not in stored and "ann@corp.io" not in stored
        call = LLMCall.from_span(spans[0])
        assert call.redacted and call.prompt_ids is None and call.response_ids is None


def test_bad_session_header_is_a_400_and_the_server_keeps_serving() -> None:
    served, store = _served(CaptureConfig(enabled=True))
    with served:
        resp = httpx.post(f"{served.url}/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
                          headers={Headers.session: "a b"}, timeout=30)
        assert resp.status_code == 400 and "session" in resp.json()["error"]["message"]
        _chat(served.url, [{"role": "user", "content": "x"}], {Headers.session: "ok"})


def test_concurrent_first_calls_of_a_session_open_it_once() -> None:
    calls: list[str] = []

    class CountingStore(InMemoryStore):
        async def open_session(self, session_id: str, **kw: Any):  # type: ignore[override]
            calls.append(session_id)
            await asyncio.sleep(0.01)
            return await super().open_session(session_id, **kw)

    capture = ProductionCapture(CaptureConfig(enabled=True))
    store = CountingStore(sweep_interval_s=None)

    async def main() -> None:
        await asyncio.gather(*(capture.records(store, "s", {}) for _ in range(10)))
        await capture.records(store, "s", {})

    asyncio.run(main())
    assert calls == ["s"]


async def test_retention_pass_forgets_open_sessions_even_when_another_replica_purged():
    """A replica whose own pass purged nothing still forgets: the other replica may have purged them."""
    import asyncio

    from agentkiln.production.capture import CaptureConfig, ProductionCapture, purge_forever

    class PurgedElsewhere:
        passes = 0

        async def purge_production(self, before: float) -> int:
            self.passes += 1
            return 0  # the other replica's pass already deleted the idle sessions

        async def open_session(self, session_id: str):
            return None

    store = PurgedElsewhere()
    capture = ProductionCapture(CaptureConfig(enabled=True, retention_days=1, purge_interval_s=0.01))
    assert await capture.records(store, "s-1", {})
    assert "s-1" in capture._opened
    task = asyncio.create_task(purge_forever(store, capture))
    while store.passes < 2:
        await asyncio.sleep(0.01)
    task.cancel()
    assert "s-1" not in capture._opened
