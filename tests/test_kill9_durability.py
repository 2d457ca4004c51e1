"""Every span the server acknowledged survives `kill -9` of `kiln serve` (SQLite and PostgreSQL stores)."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serve_process import ServeProcess


def _server(store: str, log: Path) -> ServeProcess:
    return ServeProcess(["--engine", "none", "--store", store], {**os.environ, "KILN_API_KEY": ""}, log)


@pytest.fixture(params=["sqlite", "postgres"])
def start_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator:
    started: list[ServeProcess] = []
    log_path = tmp_path / "server.log"
    schema = None
    if request.param == "postgres":  # a fresh schema of the test server, dropped afterwards
        from tests.pg_fixtures import drop_schema, require_postgres

        schema = f"kiln_kill9_{uuid.uuid4().hex[:12]}"
        store = f"{require_postgres()}?schema={schema}"
    else:
        store = str(tmp_path / "k.db")

    def start() -> ServeProcess:
        server = _server(store, log_path)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()
    if schema is not None:
        drop_schema(schema)


def _writer(url: str, rid: str, aid: str, acked: list[str], stop: threading.Event) -> None:
    """Posts spans in batches of 3 until the server dies; records ids only from 200 answers."""
    with httpx.Client(base_url=url, timeout=5) as client:
        while not stop.is_set():
            batch = [
                {
                    "rollout_id": rid,
                    "attempt_id": aid,
                    "name": "kiln.tool",
                    "span_id": uuid.uuid4().hex[:16],
                    "attributes": {"payload": "x" * 200},
                }
                for _ in range(3)
            ]
            try:
                response = client.post("/api/v1/spans", json=batch)
            except httpx.TransportError:
                return  # server killed mid-request: these spans were never acknowledged
            if response.status_code != 200:
                return
            acked.extend(span["span_id"] for span in response.json())


def test_acknowledged_spans_survive_kill9(start_server) -> None:
    server = start_server()
    started = httpx.post(f"{server.url}/api/v1/rollouts/start", json={"input": {"task": "durable"}}).json()
    rid, aid = started["rollout"]["rollout_id"], started["attempt"]["attempt_id"]

    acked: list[str] = []
    stop = threading.Event()
    writers = [threading.Thread(target=_writer, args=(server.url, rid, aid, acked, stop)) for _ in range(2)]
    for w in writers:
        w.start()
    give_up = time.monotonic() + 60
    while len(acked) < 150 and time.monotonic() < give_up and all(w.is_alive() for w in writers):
        time.sleep(0.01)
    os.kill(server.proc.pid, signal.SIGKILL)  # no shutdown hooks, no flush: only what was committed survives
    server.proc.wait(10)
    stop.set()
    for w in writers:
        w.join(30)
    assert len(acked) >= 150, "writers stopped before the kill"

    again = start_server()
    rollout = httpx.get(f"{again.url}/api/v1/rollouts/{rid}").json()
    assert rollout["rollout_id"] == rid and rollout["input"] == {"task": "durable"}
    spans = httpx.get(f"{again.url}/api/v1/rollouts/{rid}/spans", params={"limit": 10_000}, timeout=30).json()
    stored = [s["span_id"] for s in spans]
    missing = set(acked) - set(stored)
    assert not missing, f"{len(missing)} acknowledged spans lost after kill -9"
    assert len(stored) == len(set(stored))  # no duplicates either
    seqs = [s["sequence_id"] for s in spans]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def _feedback_writer(url: str, n: int, acked: list[str], stop: threading.Event) -> None:
    """Posts feedback (on a session and on a recorded call, alternately) until the server dies.

    Records client ids only from 201 answers: a post refused or cut off may be missing later, an
    acknowledged one never.
    """
    with httpx.Client(base_url=url, timeout=5) as client:
        i = 0
        while not stop.is_set():
            client_id = f"w{n}-{i}-{uuid.uuid4().hex[:8]}"
            target = {"session_id": "kill9-session"} if i % 2 else {"response_id": "chatcmpl-kill9"}
            body = {**target, "name": "thumbs", "value": bool(i % 3), "client_id": client_id, "comment": "x" * 100}
            try:
                response = client.post("/api/v1/feedback", json=body)
            except httpx.TransportError:
                return
            if response.status_code != 201:
                return
            acked.append(response.json()["client_id"])
            i += 1


def test_acknowledged_feedback_survives_kill9(start_server) -> None:
    """A "must show" of issue 17: users' feedback acknowledged by kiln serve is never lost to kill -9."""
    server = start_server()
    opened = httpx.post(f"{server.url}/api/v1/sessions", json={"session_id": "kill9-session"})
    assert opened.status_code == 200, opened.text
    rid = opened.json()["rollout"]["rollout_id"]
    call = {"rollout_id": rid, "attempt_id": "live", "name": "kiln.llm.call",
            "attributes": {"kiln.llm.call_id": "chatcmpl-kill9", "kiln.model.version": "v1"}}  # fmt: skip
    assert httpx.post(f"{server.url}/api/v1/spans", json=[call]).status_code == 200

    acked: list[str] = []
    stop = threading.Event()
    writers = [threading.Thread(target=_feedback_writer, args=(server.url, n, acked, stop)) for n in range(3)]
    for w in writers:
        w.start()
    give_up = time.monotonic() + 60
    while len(acked) < 150 and time.monotonic() < give_up and all(w.is_alive() for w in writers):
        time.sleep(0.01)
    os.kill(server.proc.pid, signal.SIGKILL)  # mid-stream: posts are in flight on every writer
    server.proc.wait(10)
    stop.set()
    for w in writers:
        w.join(30)
    assert len(acked) >= 150, "writers stopped before the kill"

    again = start_server()
    stored = httpx.get(
        f"{again.url}/api/v1/feedback", params={"session_id": "kill9-session", "limit": 10_000}, timeout=30
    ).json()
    ids = [f["client_id"] for f in stored]
    missing = set(acked) - set(ids)
    assert not missing, f"{len(missing)} acknowledged feedback posts lost after kill -9"
    assert len(ids) == len(set(ids))  # a client id is stored once
    assert {f["resolved_span_id"] is not None for f in stored} == {True, False}  # both targets were resolved
    # the response-id index survived too: a new post on the call still resolves
    more = httpx.post(f"{again.url}/api/v1/feedback", json={"response_id": "chatcmpl-kill9", "value": 1})
    assert more.status_code == 201 and more.json()["model_version"] == "v1"
