"""Feedback over HTTP (issue 17): the routes, the feedback key's limits, and OTLP GenAI evaluation events.

Everything runs against the real app on a loopback port with an admin, a runner and a feedback key.
"""

from __future__ import annotations

import httpx
import pytest

from agentkiln.protocol import FEEDBACK_PATH, SESSION_ATTEMPT_ID, SpanAttrs, SpanNames, session_rollout_id
from agentkiln.server.app import create_app
from agentkiln.server.serve import ServerThread
from agentkiln.store import InMemoryStore

ADMIN, RUNNER, FEEDBACK = "admin-key-feedback-test", "runner-key-feedback-test", "feedback-key-feedback-test"


def _auth(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


@pytest.fixture
def store() -> InMemoryStore:
    return InMemoryStore(sweep_interval_s=None)


@pytest.fixture
def client(store: InMemoryStore):
    app = create_app(store, api_key=ADMIN, runner_key=RUNNER, feedback_key=FEEDBACK, sweep_interval_s=0)
    with ServerThread(app) as thread, httpx.Client(base_url=thread.url, timeout=10) as c:
        yield c


def _session_with_call(client: httpx.Client, session_id: str = "chat-1", call_id: str = "chatcmpl-1") -> dict:
    """A production session (opened as the gateway does) with one recorded LLM call."""
    opened = client.post("/api/v1/sessions", json={"session_id": session_id}, headers=_auth(RUNNER))
    assert opened.status_code == 200, opened.text
    assert opened.json()["attempt"]["attempt_id"] == SESSION_ATTEMPT_ID and opened.json()["token"]
    span = {
        "rollout_id": session_rollout_id(session_id),
        "attempt_id": SESSION_ATTEMPT_ID,
        "name": SpanNames.llm_call,
        "attributes": {SpanAttrs.call_id: call_id, SpanAttrs.model_version: "v2"},
    }
    stored = client.post("/api/v1/spans", json=[span], headers=_auth(ADMIN))
    assert stored.status_code == 200, stored.text
    return stored.json()[0]


def test_feedback_key_posts_feedback_and_nothing_else(client: httpx.Client) -> None:
    span = _session_with_call(client)
    r = client.post(FEEDBACK_PATH, json={"response_id": "chatcmpl-1", "name": "thumbs", "value": True},
                    headers=_auth(FEEDBACK))  # fmt: skip
    assert r.status_code == 201, r.text
    fb = r.json()
    assert (fb["rollout_id"], fb["resolved_span_id"], fb["model_version"]) == (session_rollout_id("chat-1"),
                                                                              span["span_id"], "v2")  # fmt: skip
    for method, path in [
        ("GET", FEEDBACK_PATH),
        ("GET", "/api/v1/sessions/chat-1"),
        ("POST", "/api/v1/sessions"),
        ("GET", "/api/v1/rollouts/" + session_rollout_id("chat-1")),
        ("POST", "/api/v1/spans"),
        ("GET", "/api/v1/resources/latest"),
        ("GET", "/api/v1/canaries"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/traces"),
    ]:
        refused = client.request(method, path, json={}, headers=_auth(FEEDBACK))
        assert refused.status_code == 403, (method, path, refused.text)
        assert f"a feedback key may only POST {FEEDBACK_PATH}" in refused.json()["error"]["message"]


def test_runner_posts_feedback_reading_it_is_the_admins(client: httpx.Client) -> None:
    _session_with_call(client)
    assert (
        client.post(FEEDBACK_PATH, json={"session_id": "chat-1", "value": 4}, headers=_auth(RUNNER)).status_code == 201
    )
    for path in (FEEDBACK_PATH, "/api/v1/sessions/chat-1"):
        assert client.get(path, headers=_auth(RUNNER)).status_code == 403
    r = client.post("/api/v1/purge-production", json={"before": 0}, headers=_auth(RUNNER))
    assert r.status_code == 403
    listed = client.get(FEEDBACK_PATH, params={"session_id": "chat-1"}, headers=_auth(ADMIN))
    assert [f["value"] for f in listed.json()] == [4.0]
    session = client.get("/api/v1/sessions/chat-1", headers=_auth(ADMIN)).json()
    assert session["rollout"]["rollout_id"] == session_rollout_id("chat-1") and len(session["feedback"]) == 1
    assert client.get("/api/v1/sessions/never", headers=_auth(ADMIN)).status_code == 404


def test_attempt_tokens_post_no_feedback(client: httpx.Client) -> None:
    _session_with_call(client)
    token = client.post("/api/v1/sessions", json={"session_id": "chat-1"}, headers=_auth(ADMIN)).json()["token"]
    r = client.post(FEEDBACK_PATH, json={"session_id": "chat-1", "value": 1}, headers=_auth(token))
    assert r.status_code == 403 and "attempt token" in r.json()["error"]["message"]


def test_unknown_targets_and_bad_bodies_are_4xx(client: httpx.Client) -> None:
    _session_with_call(client)
    r = client.post(FEEDBACK_PATH, json={"response_id": "chatcmpl-nope", "value": 1}, headers=_auth(FEEDBACK))
    assert r.status_code == 404 and "chatcmpl-nope" in r.json()["error"]["message"]
    both = {"response_id": "chatcmpl-1", "session_id": "chat-1", "value": 1}
    r = client.post(FEEDBACK_PATH, json=both, headers=_auth(FEEDBACK))
    assert r.status_code == 422 and "exactly one target" in r.json()["error"]["message"]
    r = client.post(FEEDBACK_PATH, json={"span_id": "abc", "value": 1}, headers=_auth(FEEDBACK))
    assert r.status_code == 422 and "rollout_id" in r.json()["error"]["message"]
    r = client.post(FEEDBACK_PATH, json={"session_id": "chat-1"}, headers=_auth(FEEDBACK))
    assert r.status_code == 422 and "value" in r.json()["error"]["message"]


def test_idempotency_key_is_durable_across_restarts(store: InMemoryStore) -> None:
    """A retry that reaches a restarted server (no replay memory) still stores one record."""
    headers = {**_auth(FEEDBACK), "Idempotency-Key": "post-7"}
    answers = []
    for _ in range(2):  # two app instances over one store: the second has a fresh idempotency middleware
        app = create_app(store, api_key=ADMIN, feedback_key=FEEDBACK, sweep_interval_s=0)
        with ServerThread(app) as thread, httpx.Client(base_url=thread.url, timeout=10) as c:
            if not answers:
                c.post("/api/v1/sessions", json={"session_id": "s"}, headers=_auth(ADMIN))
            answers.append(c.post(FEEDBACK_PATH, json={"session_id": "s", "value": 1}, headers=headers))
    assert [a.status_code for a in answers] == [201, 201]
    assert answers[0].json() == answers[1].json() and answers[0].json()["client_id"] == "post-7"


def test_a_feedback_key_needs_an_admin_key() -> None:
    with pytest.raises(ValueError, match="feedback key needs an admin"):
        create_app(InMemoryStore(), feedback_key="x")


# --------------------------------------------------------------------------- OTLP GenAI evaluation events


def _value(v: object) -> dict:
    if isinstance(v, str):
        return {"stringValue": v}
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}
    return {"doubleValue": v}


def _kv(attrs: dict) -> list[dict]:
    return [{"key": k, "value": _value(v)} for k, v in attrs.items()]


def _export(span_attrs: dict, *events: dict, span_id: str = "b7ad6b7169203331") -> dict:
    span = {
        "traceId": "0af7651916cd43dd8448eb211c80319c",
        "spanId": span_id,
        "name": "evaluate",
        "startTimeUnixNano": "1700000000000000000",
        "attributes": _kv(span_attrs),
        "events": [
            {"name": "gen_ai.evaluation.result", "timeUnixNano": "1700000000000000001", "attributes": _kv(e)}
            for e in events
        ],
    }
    return {
        "resourceSpans": [{"resource": {"attributes": []}, "scopeSpans": [{"scope": {"name": "ev"}, "spans": [span]}]}]
    }


def _feedback(client: httpx.Client) -> list[dict]:
    return client.get(FEEDBACK_PATH, headers=_auth(ADMIN)).json()


def test_otlp_evaluation_events_become_feedback(client: httpx.Client) -> None:
    call = _session_with_call(client, call_id="chatcmpl-ev")
    export = _export(
        {"gen_ai.response.id": "chatcmpl-ev"},  # on the span: applies to its events
        {"gen_ai.evaluation.name": "relevance", "gen_ai.evaluation.score.value": 0.75,
         "gen_ai.evaluation.score.label": "relevant", "gen_ai.evaluation.explanation": "on topic"},
        {"gen_ai.evaluation.name": "tone", "gen_ai.evaluation.score.label": "rude"},
        {"gen_ai.evaluation.name": "broken", "error.type": "timeout"},  # a failed evaluator: no verdict
    )  # fmt: skip
    for _ in range(2):  # the exporter re-sends the batch: each verdict is stored once
        r = client.post("/v1/traces", json=export, headers=_auth(ADMIN))
        assert r.status_code == 200, r.text
    got = _feedback(client)
    assert [(f["name"], f["value"], f["comment"], f["source"]) for f in got] == [
        ("relevance", 0.75, "on topic", "otlp"), ("tone", "rude", None, "otlp")]  # fmt: skip
    assert got[0]["metadata"] == {"label": "relevant"} and got[0]["resolved_span_id"] == call["span_id"]
    assert all(f["response_id"] == "chatcmpl-ev" for f in got)
    # the evaluator's span named no rollout: it gave verdicts, it is not stored
    spans = client.get(f"/api/v1/rollouts/{session_rollout_id('chat-1')}/spans", headers=_auth(ADMIN)).json()
    assert [s["name"] for s in spans] == [SpanNames.llm_call]


def test_otlp_evaluation_on_a_recorded_span_rates_that_span(client: httpx.Client) -> None:
    _session_with_call(client)
    rid = session_rollout_id("chat-1")
    export = _export({SpanAttrs.rollout_id: rid, SpanAttrs.attempt_id: SESSION_ATTEMPT_ID},
                     {"gen_ai.evaluation.name": "helpful", "gen_ai.evaluation.score.value": 1}, span_id="00000000000000aa")  # fmt: skip
    assert client.post("/v1/traces", json=export, headers=_auth(RUNNER)).status_code == 200
    [fb] = _feedback(client)
    assert (fb["span_id"], fb["rollout_id"], fb["resolved_span_id"], fb["value"]) == ("00000000000000aa", rid,
                                                                                     "00000000000000aa", 1.0)  # fmt: skip


@pytest.mark.parametrize(
    ("span_attrs", "event", "status", "words"),
    [
        ({"gen_ai.response.id": "chatcmpl-nope"}, {"gen_ai.evaluation.name": "x", "gen_ai.evaluation.score.value": 1},
         404, "chatcmpl-nope"),
        ({"gen_ai.response.id": "chatcmpl-1"}, {"gen_ai.evaluation.score.value": 1}, 400, "gen_ai.evaluation.name"),
        ({"gen_ai.response.id": "chatcmpl-1"}, {"gen_ai.evaluation.name": "x"}, 400, "score.value"),
        ({}, {"gen_ai.evaluation.name": "x", "gen_ai.evaluation.score.value": 1}, 400, "gen_ai.response.id"),
    ],
)  # fmt: skip
def test_otlp_evaluations_that_cannot_be_feedback_are_refused(
    client: httpx.Client, span_attrs: dict, event: dict, status: int, words: str
) -> None:
    _session_with_call(client)
    r = client.post("/v1/traces", json=_export(span_attrs, event), headers=_auth(ADMIN))
    assert r.status_code == status and words in r.text, r.text
    assert _feedback(client) == []


def test_otlp_evaluations_need_the_admin_or_runner_key(client: httpx.Client) -> None:
    _session_with_call(client)
    token = client.post("/api/v1/sessions", json={"session_id": "chat-1"}, headers=_auth(ADMIN)).json()["token"]
    export = _export({SpanAttrs.rollout_id: session_rollout_id("chat-1"), SpanAttrs.attempt_id: SESSION_ATTEMPT_ID},
                     {"gen_ai.evaluation.name": "x", "gen_ai.evaluation.score.value": 1})  # fmt: skip
    r = client.post("/v1/traces", json=export, headers=_auth(token))
    assert r.status_code == 403 and "feedback" in r.text
    assert _feedback(client) == []


def test_kiln_serve_passes_the_feedback_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import agentkiln.cli.serve  # noqa: F401  (adds the command)
    from agentkiln.cli.app import app

    seen: dict = {}
    monkeypatch.setattr("agentkiln.server.serve.serve", lambda store, **kw: seen.update(kw))
    monkeypatch.setenv("KILN_FEEDBACK_KEY", "from-env")
    result = CliRunner().invoke(app, ["serve", "--engine", "none", "--api-key", "a"])
    assert result.exit_code == 0, result.output
    assert seen["feedback_key"] == "from-env"
    result = CliRunner().invoke(app, ["serve", "--engine", "none", "--api-key", "a", "--feedback-key", "flag"])
    assert result.exit_code == 0 and seen["feedback_key"] == "flag"
