"""`/metrics`: Prometheus text whose counters move when a rollout runs (tiny real engine, real app)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentkiln.models import AttemptError, AttemptStatus, FailureKind
from agentkiln.server.app import create_app
from agentkiln.server.metrics import gateway_api
from agentkiln.server.serve import ServerThread
from agentkiln.store.memory import InMemoryStore
from tests.tiny_server import tiny_server


def scrape(url: str, **kw) -> dict[tuple[str, tuple], float]:
    resp = httpx.get(f"{url}/metrics", timeout=30, **kw)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def server():
    with tiny_server() as s:
        yield s


def test_counters_move_after_a_rollout(server):
    before = scrape(server.url)
    assert all(name.startswith("kiln_") for name, _ in before)
    rid_resp = httpx.post(f"{server.url}/api/v1/rollouts/start", json={"input": {"task": "m"}}, timeout=30).json()
    rid, aid = rid_resp["rollout"]["rollout_id"], rid_resp["attempt"]["attempt_id"]
    base = f"{server.url}/rollout/{rid}/attempt/{aid}/v1"
    resp = httpx.post(
        f"{base}/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=120,
    )
    assert resp.status_code == 200, resp.text
    asyncio.run(server.store.update_attempt(rid, aid, status=AttemptStatus.succeeded))
    # A second rollout fails with a tool error; a third waits in the queue.
    failing = asyncio.run(server.store.start_rollout({"task": "f"}))
    asyncio.run(
        server.store.update_attempt(
            failing.rollout.rollout_id,
            failing.attempt.attempt_id,
            status=AttemptStatus.failed,
            error=AttemptError(kind=FailureKind.tool_error, message="calculator broke"),
        )
    )
    asyncio.run(server.store.enqueue_rollout({"task": "q"}))

    after = scrape(server.url)
    hist = "kiln_gateway_request_duration_seconds_count"
    assert (
        value(after, hist, api="chat.completions", code="200")
        == value(before, hist, api="chat.completions", code="200") + 1
    )
    assert value(after, "kiln_gateway_request_duration_seconds_sum", api="chat.completions", code="200") > 0
    for counter in (
        "kiln_engine_generated_tokens_total",
        "kiln_engine_prompt_tokens_total",
        "kiln_engine_sequences_total",
    ):
        assert value(after, counter) > value(before, counter), counter
    assert value(after, "kiln_attempts", status="succeeded") == value(before, "kiln_attempts", status="succeeded") + 1
    assert (
        value(after, "kiln_attempt_failures", kind="tool_error")
        == value(before, "kiln_attempt_failures", kind="tool_error") + 1
    )
    assert value(after, "kiln_queue_depth") == value(before, "kiln_queue_depth") + 1
    assert value(after, "kiln_rollouts_per_second") > 0
    assert value(after, "kiln_engine_batch_size_max") >= 1
    assert value(after, "kiln_engine_info", model="tiny", version=server.engine.model_version) == 1


def test_weight_loads_are_counted(server, tmp_path):
    before = scrape(server.url)
    server.engine.stats.weight_swaps += 1  # what load_weights does; a real load is covered by the weight tests
    assert (
        value(scrape(server.url), "kiln_engine_weight_loads_total")
        == value(before, "kiln_engine_weight_loads_total") + 1
    )


def test_only_gateway_paths_are_timed():
    assert gateway_api("/v1/chat/completions") == "chat.completions"
    assert gateway_api("/rollout/r/attempt/a/agent/solver/v1/responses") == "responses"
    assert gateway_api("/api/v1/rollouts") is None
    assert gateway_api("/metrics") is None


def test_metrics_need_the_key_when_the_server_has_one():
    store = InMemoryStore(sweep_interval_s=None)
    thread = ServerThread(create_app(store, api_key="sekret", sweep_interval_s=0))
    url = thread.start()
    try:
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 401
        samples = scrape(url, headers={"Authorization": "Bearer sekret"})
        assert value(samples, "kiln_queue_depth") == 0
    finally:
        thread.stop()
