"""The REST API answers every client mistake with a clear 4xx and keeps serving afterwards."""

from __future__ import annotations

import threading
from typing import Iterator

import httpx
import pytest

from agentkiln.server.app import create_app
from agentkiln.server.serve import ServerThread
from agentkiln.store.memory import InMemoryStore

KEY = "s3cret"
LIMIT = 100_000


class _BuggyStore(InMemoryStore):
    async def query_workers(self):  # type: ignore[override]
        raise RuntimeError("boom")


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    app = create_app(_BuggyStore(sweep_interval_s=None), api_key=KEY, max_body_bytes=LIMIT, sweep_interval_s=0)
    with ServerThread(app) as server:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10) as c:
            yield c


def _error(resp: httpx.Response, status: int, type_: str | None = None) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()["error"]
    if type_ is not None:
        assert body["type"] == type_
    assert body["message"]
    return body["message"]


def _alive(c: httpx.Client) -> None:
    assert c.get("/health").json() == {"status": "ok"}
    assert c.get("/api/v1/rollouts", params={"limit": 1}).status_code == 200


# ----------------------------------------------------------------------------- happy paths


def test_queue_lifecycle_over_http(client: httpx.Client) -> None:
    r = client.post("/api/v1/rollouts", json={"input": {"q": "2+2"}, "mode": "train", "config": {"max_attempts": 2}})
    assert r.status_code == 200
    rollout = r.json()
    assert rollout["status"] == "queuing" and rollout["input"] == {"q": "2+2"}

    got = client.post("/api/v1/dequeue", json={"worker_id": "w1"}).json()
    rid, aid = got["rollout"]["rollout_id"], got["attempt"]["attempt_id"]
    assert rid == rollout["rollout_id"] and got["attempt"]["worker_id"] == "w1"
    assert client.post("/api/v1/dequeue").json() is None  # empty body allowed, empty queue -> null

    spans = [
        {"rollout_id": rid, "attempt_id": aid, "name": "kiln.reward", "attributes": {"kiln.reward.value": 1.0}},
        {"rollout_id": rid, "attempt_id": aid, "name": "kiln.llm.call"},
    ]
    added = client.post("/api/v1/spans", json=spans).json()
    assert [s["sequence_id"] for s in added] == [1, 2]
    listed = client.get(f"/api/v1/rollouts/{rid}/spans", params={"attempt_id": "latest", "name": "kiln.reward"}).json()
    assert [s["name"] for s in listed] == ["kiln.reward"]

    done = client.patch(f"/api/v1/rollouts/{rid}/attempts/{aid}", json={"status": "succeeded"}).json()
    assert done["status"] == "succeeded"
    assert client.get(f"/api/v1/rollouts/{rid}").json()["status"] == "succeeded"
    assert [a["attempt_id"] for a in client.get(f"/api/v1/rollouts/{rid}/attempts").json()] == [aid]
    assert client.get(f"/api/v1/rollouts/{rid}/attempts/latest").json()["attempt_id"] == aid
    waited = client.post("/api/v1/rollouts/wait", json={"rollout_ids": [rid], "timeout": 0}).json()
    assert [w["rollout_id"] for w in waited] == [rid]


def test_batch_query_start_cancel(client: httpx.Client) -> None:
    items = [{"input": i, "mode": "val"} for i in range(3)]
    batch = client.post("/api/v1/rollouts/batch", json={"items": items}).json()
    assert [b["input"] for b in batch] == [0, 1, 2]
    started = client.post("/api/v1/rollouts/start", json={"input": "direct", "worker_id": "w9"}).json()
    assert started["rollout"]["status"] == "running"
    cancelled = client.post(f"/api/v1/rollouts/{batch[0]['rollout_id']}/cancel").json()
    assert cancelled["status"] == "cancelled"

    q = client.get("/api/v1/rollouts", params=[("status", "queuing,cancelled"), ("mode", "val")]).json()
    assert [r["input"] for r in q] == [0, 1, 2]
    q = client.get("/api/v1/rollouts", params=[("status", "running"), ("status", "cancelled")]).json()
    assert {r["input"] for r in q} == {0, "direct"}
    q = client.get("/api/v1/rollouts", params={"limit": 1, "offset": 1, "mode": "val"}).json()
    assert [r["input"] for r in q] == [1]
    patched = client.patch(f"/api/v1/rollouts/{batch[1]['rollout_id']}", json={"metadata": {"tag": "x"}}).json()
    assert patched["metadata"] == {"tag": "x"} and patched["status"] == "queuing"


def test_resources_and_workers(client: httpx.Client) -> None:
    assert client.get("/api/v1/resources/latest").json() is None
    body = {"llms": {"main": {"model": "smollm2"}}, "prompts": {"sys": {"template": "Hi {name}"}}}
    first = client.post("/api/v1/resources", json=body).json()
    second = client.post("/api/v1/resources", json=body).json()
    assert (first["version"], second["version"]) == (1, 2)
    assert client.get("/api/v1/resources/latest").json()["resources_id"] == second["resources_id"]
    assert client.get(f"/api/v1/resources/{first['resources_id']}").json()["version"] == 1
    assert [r["version"] for r in client.get("/api/v1/resources").json()] == [1, 2]

    w = client.post("/api/v1/workers/w1/heartbeat", json={"status": "busy", "metadata": {"host": "a"}}).json()
    assert w["worker_id"] == "w1" and w["status"] == "busy"
    assert client.post("/api/v1/workers/w2/heartbeat").json()["worker_id"] == "w2"
    assert client.post("/api/v1/check-timeouts", json={}).json() == []


# ----------------------------------------------------------------------------- client mistakes


def test_auth(client: httpx.Client) -> None:
    url = str(client.base_url)
    with httpx.Client(base_url=url) as anon:
        assert anon.get("/health").status_code == 200  # open for load balancers
        assert "missing API key" in _error(anon.get("/api/v1/rollouts"), 401, "Unauthorized")
        assert "invalid API key" in _error(anon.get("/api/v1/rollouts", headers={"X-Api-Key": "nope"}), 401)
        bad = anon.post("/api/v1/rollouts", json={}, headers={"Authorization": "Bearer nope"})
        _error(bad, 401)
        assert anon.get("/api/v1/rollouts", headers={"X-Api-Key": KEY}).status_code == 200
    assert client.get("/api/v1/rollouts").json() == []  # nothing was written by the rejected POST
    _alive(client)


def test_unknown_ids_and_routes(client: httpx.Client) -> None:
    assert "ro-missing" in _error(client.get("/api/v1/rollouts/ro-missing"), 404, "NotFoundError")
    _error(client.patch("/api/v1/rollouts/ro-missing", json={"status": "cancelled"}), 404, "NotFoundError")
    _error(client.get("/api/v1/resources/res-missing"), 404, "NotFoundError")
    rid = client.post("/api/v1/rollouts", json={"input": 1}).json()["rollout_id"]
    _error(client.patch(f"/api/v1/rollouts/{rid}/attempts/at-missing", json={}), 404, "NotFoundError")
    assert "no route GET /api/v1/nope" in _error(client.get("/api/v1/nope"), 404, "NotFound")
    _error(client.delete(f"/api/v1/rollouts/{rid}"), 405)
    _alive(client)


def test_invalid_transition(client: httpx.Client) -> None:
    rid = client.post("/api/v1/rollouts", json={"input": 1}).json()["rollout_id"]
    assert client.post(f"/api/v1/rollouts/{rid}/cancel").status_code == 200
    msg = _error(client.patch(f"/api/v1/rollouts/{rid}", json={"status": "queuing"}), 409, "InvalidTransitionError")
    assert "cancelled" in msg
    _alive(client)


def test_malformed_and_invalid_bodies(client: httpx.Client) -> None:
    post = client.post
    headers = {"content-type": "application/json"}
    msg = _error(post("/api/v1/rollouts", content=b'{"input": ', headers=headers), 400, "MalformedJSON")
    assert "malformed JSON" in msg
    assert "rollout_ids" in _error(post("/api/v1/rollouts/wait", json={"timeout": 1}), 422, "ValidationError")
    assert "colour" in _error(post("/api/v1/rollouts", json={"input": 1, "colour": "red"}), 422)
    assert "config.max_attempts" in _error(post("/api/v1/rollouts", json={"config": {"max_attempts": "many"}}), 422)
    assert "status" in _error(post("/api/v1/rollouts", json={"status": "running"}), 422)  # not settable on enqueue
    assert "mode" in _error(post("/api/v1/rollouts", json={"mode": "fly"}), 422)
    assert "limit" in _error(client.get("/api/v1/rollouts", params={"limit": "abc"}), 422)
    assert "status" in _error(client.get("/api/v1/rollouts", params={"status": "sleeping"}), 422)
    assert "name" in _error(post("/api/v1/spans", json=[{"rollout_id": "r", "attempt_id": "a"}]), 422)
    _error(post("/api/v1/spans", json={"not": "a list"}), 422)
    _alive(client)


def test_oversized_bodies(client: httpx.Client) -> None:
    big = {"input": "x" * (LIMIT + 10)}
    assert "bytes" in _error(client.post("/api/v1/rollouts", json=big), 413, "PayloadTooLarge")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server must count what streams in
        yield b'{"input": "'
        for _ in range(20):
            yield b"y" * 10_000
        yield b'"}'

    _error(client.post("/api/v1/rollouts", content=chunks(), headers={"content-type": "application/json"}), 413)
    assert client.get("/api/v1/rollouts").json() == []
    _alive(client)


def test_unexpected_error_is_500_and_server_survives(client: httpx.Client) -> None:
    assert "boom" in _error(client.get("/api/v1/workers"), 500, "InternalError")
    _alive(client)


def test_idempotency_key_replays_the_first_answer(client: httpx.Client) -> None:
    headers = {"Idempotency-Key": "k-1"}
    first = client.post("/api/v1/rollouts", json={"input": 1}, headers=headers).json()
    again = client.post("/api/v1/rollouts", json={"input": 1}, headers=headers).json()
    assert first == again
    other = client.post("/api/v1/rollouts", json={"input": 1}, headers={"Idempotency-Key": "k-2"}).json()
    assert other["rollout_id"] != first["rollout_id"]
    assert len(client.get("/api/v1/rollouts").json()) == 2


def test_concurrent_requests(client: httpx.Client) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with httpx.Client(base_url=str(client.base_url), headers=dict(client.headers), timeout=10) as c:
                for i in range(10):
                    assert c.post("/api/v1/rollouts", json={"input": i}).status_code == 200
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(client.get("/api/v1/rollouts", params={"limit": 1000}).json()) == 40


class _CountingStore(InMemoryStore):
    def __init__(self) -> None:
        super().__init__(sweep_interval_s=None)
        self.sweeps = threading.Semaphore(0)

    async def check_timeouts(self, now=None):  # type: ignore[override]
        self.sweeps.release()
        if now is None:
            raise RuntimeError("a failing sweep must not stop the next one")
        return await super().check_timeouts(now)


def test_background_sweep_runs_and_survives_errors() -> None:
    store = _CountingStore()
    with ServerThread(create_app(store, sweep_interval_s=0.01)):
        for _ in range(3):
            assert store.sweeps.acquire(timeout=10)


def test_resent_spans_are_not_stored_twice(client: httpx.Client) -> None:
    got = client.post("/api/v1/rollouts/start", json={"input": 1}).json()
    rid, aid = got["rollout"]["rollout_id"], got["attempt"]["attempt_id"]
    span = {"rollout_id": rid, "attempt_id": aid, "name": "s", "span_id": "aaaa"}
    first = client.post("/api/v1/spans", json=[span, {**span, "span_id": "bbbb"}]).json()
    again = client.post("/api/v1/spans", json=[{**span, "span_id": "cccc"}, span, span]).json()  # no Idempotency-Key
    assert [s["sequence_id"] for s in first] == [1, 2]
    assert [(s["span_id"], s["sequence_id"]) for s in again] == [("cccc", 3), ("aaaa", 1), ("aaaa", 1)]
    stored = client.get(f"/api/v1/rollouts/{rid}/spans").json()
    assert [s["span_id"] for s in stored] == ["aaaa", "bbbb", "cccc"]


class _FakeEngine:
    def __init__(self) -> None:
        self.events: list[str] = []

    async def start(self) -> None:
        self.events.append("start")

    async def close(self) -> None:
        self.events.append("close")


class _ClosingStore(InMemoryStore):
    closed = False

    async def close(self) -> None:
        self.closed = True


def test_owned_store_and_engine_follow_the_server_lifespan() -> None:
    from agentkiln.server.serve import own_resources

    store, engine = _ClosingStore(sweep_interval_s=None), _FakeEngine()
    app = create_app(store, sweep_interval_s=0)
    app.state.engine = engine
    own_resources(app, store, engine)
    with ServerThread(app) as server:
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert engine.events == ["start"] and not store.closed
    assert engine.events == ["start", "close"] and store.closed


def test_unowned_store_stays_open() -> None:
    store = _ClosingStore(sweep_interval_s=None)
    with ServerThread(create_app(store, sweep_interval_s=0)):
        pass
    assert not store.closed


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        # found by schemathesis as 500s (issue 13): an omitted input is a null input, not a crash
        ("POST", "/api/v1/rollouts", {}, 200),
        ("POST", "/api/v1/rollouts/batch", {"items": [{}]}, 200),
        ("POST", "/api/v1/rollouts/start", {}, 200),
        ("POST", "/api/v1/rollouts", {"resources_id": ""}, 422),
        ("GET", "/api/v1/rollouts?offset=99999999999999999999999", None, 422),
        ("GET", "/api/v1/rollouts/ro-x/spans?offset=99999999999999999999999", None, 422),
        # schema-violating bodies that were accepted: JSON booleans are not numbers
        ("POST", "/api/v1/check-timeouts", {"now": False}, 422),
        ("POST", "/api/v1/rollouts/wait", {"rollout_ids": [], "timeout": False}, 422),
        ("POST", "/api/v1/rollouts", {"input": 1, "config": {"timeout_s": True}}, 422),
    ],
)
def test_inputs_that_broke_the_store_api(client: httpx.Client, method: str, path: str, body, status: int) -> None:
    r = client.request(method, path, json=body)
    assert r.status_code == status, r.text
    if status >= 400:
        assert r.json()["error"]["message"]


# ----------------------------------------------------------------------------- strict bodies (issue 13)


@pytest.mark.parametrize(
    ("body", "content_type", "status", "words"),
    [
        (b"input=1", "application/x-www-form-urlencoded", 415, "must be JSON"),
        (b'{"input": 1}', "text/plain", 415, "text/plain"),
        (b'{"input": 1}', None, 415, "no Content-Type"),
        (b'{"input": NaN}', "application/json", 422, "NaN"),
        (b'{"input": [1, -Infinity]}', "application/json", 422, "-Infinity"),
        (b'{"input": 1e400}', "application/json", 422, "out of range"),
        (b'{"input": ' + b"[" * 65 + b"]" * 65 + b"}", "application/json", 422, "deeper than 64"),
        (b"[" * 100_000, "application/json", 422, "deeper than 64"),  # once a RecursionError
        (b'{"input": "\\ud800"}', "application/json", 400, "surrogate"),  # SQLite cannot store it
        (b'{"input": 1', "application/vnd.kiln+json", 400, "malformed JSON"),
    ],
)
def test_bodies_must_be_strict_json(client: httpx.Client, body: bytes, content_type, status: int, words: str) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    assert words in _error(client.post("/api/v1/rollouts", content=body, headers=headers), status)
    assert client.get("/api/v1/rollouts").json() == []
    _alive(client)


def test_json_media_types_and_empty_bodies_are_accepted(client: httpx.Client) -> None:
    headers = {"content-type": "application/json; charset=utf-8"}
    ok = client.post("/api/v1/rollouts", content=b'{"input": [1, 2.5]}', headers=headers)
    assert ok.status_code == 200 and ok.json()["input"] == [1, 2.5]
    deep = {"input": [[[[[[1]]]]]]}
    assert client.post("/api/v1/rollouts", json=deep).json()["input"] == deep["input"]
    assert client.post("/api/v1/dequeue", headers={"content-type": "text/plain"}).status_code == 200  # no body


_MANY = {str(i): 1 for i in range(1_001)}


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/v1/rollouts", {"config": {"max_attempts": True}}, "max_attempts"),
        ("/api/v1/rollouts", {"config": {"max_attempts": "3"}}, "max_attempts"),
        ("/api/v1/rollouts", {"config": {"unresponsive_s": "1.5"}}, "unresponsive_s"),
        ("/api/v1/rollouts", {"metadata": {str(i): i for i in range(1_001)}}, "metadata"),
        ("/api/v1/resources", {"metadata": {str(i): i for i in range(1_001)}}, "metadata"),
        ("/api/v1/spans", [{"rollout_id": "r", "attempt_id": "a", "name": "s", "start_time": "1"}], "start_time"),
        ("/api/v1/spans", [{"rollout_id": "r", "attempt_id": "a", "name": "s", "attributes": _MANY}], "attributes"),
        ("/api/v1/spans", [{"rollout_id": "r" * 513, "attempt_id": "a", "name": "s"}], "rollout_id"),
    ],
)
def test_schema_breaking_values_are_refused(client: httpx.Client, path: str, body, field: str) -> None:
    assert field in _error(client.post(path, json=body), 422, "ValidationError")


def test_integral_floats_are_integers(client: httpx.Client) -> None:
    r = client.post("/api/v1/rollouts", json={"config": {"max_attempts": 3.0, "timeout_s": 2}})
    assert r.status_code == 200, r.text
    assert r.json()["config"]["max_attempts"] == 3 and r.json()["config"]["timeout_s"] == 2.0


def test_method_not_allowed_lists_the_resource_methods(client: httpx.Client) -> None:
    r = client.request("OPTIONS", "/api/v1/rollouts/ro-x")
    assert r.status_code == 405 and r.headers["allow"] == "GET, PATCH"
    assert "GET, PATCH" in r.json()["error"]["message"]
    # A literal path wins over the template that would also match it.
    assert client.delete("/api/v1/rollouts/batch").headers["allow"] == "POST"
    assert client.put("/api/v1/rollouts").headers["allow"] == "GET, POST"


def test_openapi_documents_every_status_with_the_error_body(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path, methods in paths.items():
        if not path.startswith("/api/v1/") or path == "/api/v1/engine":
            continue
        for method, op in methods.items():
            codes = set(op["responses"])
            assert {"400", "401", "403", "422", "503"} <= codes and codes & {"200", "201"}, (method, path, codes)
            if "requestBody" in op:
                assert {"413", "415"} <= codes, (method, path)
            if "{rollout_id}" in path or "{resources_id}" in path:
                assert "404" in codes, (method, path)
            assert op["responses"]["404" if "404" in codes else "401"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorBody"
            }
    assert "409" in paths["/api/v1/rollouts/{rollout_id}"]["patch"]["responses"]
    assert "409" in paths["/api/v1/rollouts/{rollout_id}/attempts/{attempt_id}"]["patch"]["responses"]
    status = next(p for p in paths["/api/v1/rollouts"]["get"]["parameters"] if p["name"] == "status")
    assert "queuing" in str(status["schema"])  # the accepted statuses are in the schema, not only in code


@pytest.mark.parametrize(
    ("body", "content_type", "status", "words"),
    [
        (b"spans", "text/plain", 415, "application/x-protobuf or application/json"),
        (b'{"resourceSpans": [{"x": NaN}]}', "application/json", 422, "NaN"),
        (b'{"resourceSpans": ' + b"[" * 5_000 + b"]" * 5_000 + b"}", "application/json", 422, "deeper than 64"),
    ],
)
def test_otlp_intake_refuses_what_it_cannot_read(client: httpx.Client, body: bytes, content_type, status, words):
    assert words in _error(client.post("/v1/traces", content=body, headers={"content-type": content_type}), status)
    _alive(client)
