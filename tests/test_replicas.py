"""Two real `kiln serve` replicas on one PostgreSQL schema work as one server (issue 14).

A rollout enqueued through A is dequeued through B, its agent's LLM call goes through A's gateway
with the token B minted, its reward span goes through B, and its spans and reward read back
through B; weights published through A are served by B's engine; keyed writes run once whichever
replica a retry reaches; the timeout sweep ends an abandoned attempt once across both. Each test
gets a fresh schema. Skipped without PostgreSQL, failed in CI (see pg_fixtures).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agentkiln.models import AttemptStatus, LLMEndpoint, ResourcesIn, RolloutConfig, RolloutStatus, SpanIn
from agentkiln.protocol import ENGINE_STATUS_PATH, SpanAttrs, SpanNames, attempt_base_url, auth_headers
from agentkiln.store.client import HttpStore
from tests.pg_fixtures import drop_schema, import_psycopg_or_skip_module, require_postgres
from tests.serve_process import ServeProcess

import_psycopg_or_skip_module()

ADMIN, RUNNER = "admin-key-replicas", "runner-key-replicas"


class Replica(ServeProcess):
    """One `kiln serve` process (tiny engine) on the shared store, its output in a log file."""

    def __init__(self, name: str, store: str, weights_root: Path, log_dir: Path) -> None:
        args = ["--engine", "tiny", "--store", store, "--weights-root", str(weights_root)]
        env = {**os.environ, "KILN_API_KEY": ADMIN, "KILN_RUNNER_KEY": RUNNER, "HF_HUB_OFFLINE": "1"}
        super().__init__(args, env, log_dir / f"replica-{name}.log", name=f"replica {name}")

    def store(self, key: str = ADMIN) -> HttpStore:
        return HttpStore(self.url, api_key=key, retries=0)

    def get(self, path: str) -> httpx.Response:
        response = httpx.get(self.url + path, headers=auth_headers(ADMIN), timeout=10)
        response.raise_for_status()
        return response

    def metric(self, name: str) -> float:
        match = re.search(rf"^{name} (\S+)$", self.get("/metrics").text, re.MULTILINE)
        assert match is not None, f"{name} missing from {self.name}'s /metrics"
        return float(match.group(1))


@pytest.fixture
def tiny_dir() -> Path:
    from agentkiln.engine.model_files import tiny_model_dir

    return Path(tiny_model_dir())


@pytest.fixture
def replicas(tmp_path: Path, tiny_dir: Path) -> Iterator[tuple[Replica, Replica]]:
    """Replicas A and B: one schema, one admin key, one runner key, both allowed to load the tiny checkpoint."""
    schema = f"kiln_replicas_{uuid.uuid4().hex[:12]}"
    store = f"{require_postgres()}?schema={schema}"
    started = [Replica(name, store, tiny_dir.parent, tmp_path) for name in "AB"]
    try:
        for replica in started:
            replica.wait_ready()
        yield started[0], started[1]
    finally:
        for replica in started:
            replica.stop()
        drop_schema(schema)


async def _wait_for(what: str, check, timeout: float = 15.0):  # type: ignore[no-untyped-def]
    give_up = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > give_up:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_a_rollout_crosses_replicas_and_both_serve_the_published_weights(
    replicas: tuple[Replica, Replica], tiny_dir: Path
) -> None:
    a, b = replicas
    async with a.store() as admin_a, b.store() as admin_b, a.store(RUNNER) as runner_a, b.store(RUNNER) as runner_b:
        # Weights published through A: each replica's engine syncs them from the store.
        res = await admin_a.add_resources(
            ResourcesIn(llms={"main": LLMEndpoint(model="tiny", adapter_path=str(tiny_dir))})
        )
        for replica in (a, b):
            status = await _wait_for(
                f"{replica.name} to serve {res.resources_id}",
                lambda r=replica: (
                    (s := r.get(ENGINE_STATUS_PATH).json())["loaded_resources_id"] == res.resources_id and s
                ),
            )
            assert status["model_version"] == f"v{res.version}" and status["last_error"] is None

        rollout = await admin_a.enqueue_rollout({"q": "hello"}, resources_id=res.resources_id)
        got = await runner_b.dequeue_rollout(worker_id="w-1")
        assert got is not None and got.rollout.rollout_id == rollout.rollout_id and got.token
        rid, aid = rollout.rollout_id, got.attempt.attempt_id

        # The agent calls A's gateway with the token B minted (both derive it from the shared admin key).
        async with httpx.AsyncClient(headers=auth_headers(got.token), timeout=30) as agent_http:
            call = await agent_http.post(
                attempt_base_url(a.url, rid, aid) + "/chat/completions",
                json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            )
        assert call.status_code == 200, call.text
        reward = SpanIn(rollout_id=rid, attempt_id=aid, name=SpanNames.reward,
                        attributes={SpanAttrs.reward_value: 0.75, SpanAttrs.reward_name: "primary",
                                    SpanAttrs.reward_final: True})  # fmt: skip
        async with b.store(got.token) as agent_b:  # the agent's own span, through B
            await agent_b.add_spans([reward])
        await runner_a.update_attempt(rid, aid, status=AttemptStatus.succeeded, worker_id="w-1")

        [done] = await admin_b.wait_for_rollouts([rid], timeout=10)
        assert done.status == RolloutStatus.succeeded
        spans = await admin_b.query_spans(rid)
        [llm] = [s for s in spans if s.name == SpanNames.llm_call]
        assert llm.attempt_id == aid and llm.attributes[SpanAttrs.model_version] == f"v{res.version}"
        assert llm.attributes[SpanAttrs.response_token_ids]  # the token ids the trainer needs
        [got_reward] = [s for s in spans if s.name == SpanNames.reward]
        assert got_reward.attributes[SpanAttrs.reward_value] == 0.75
        assert [s.sequence_id for s in spans] == [1, 2]  # one sequence per attempt across replicas


async def test_keyed_writes_run_once_whichever_replica_a_retry_reaches(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    headers = {**auth_headers(ADMIN), "Idempotency-Key": "enqueue-1"}
    async with httpx.AsyncClient(headers=headers, timeout=30) as http:
        first = await http.post(f"{a.url}/api/v1/rollouts", json={"input": 1})
        retry = await http.post(f"{b.url}/api/v1/rollouts", json={"input": 1})  # the answer to A was "lost"
        assert first.status_code == retry.status_code == 200
        assert retry.content == first.content  # the same rollout, byte for byte

        # A retried dequeue on the other replica hands out the same attempt, not a second rollout.
        await http.post(f"{a.url}/api/v1/rollouts", json={"input": 2}, headers={"Idempotency-Key": "enqueue-2"})
        dq = {"Idempotency-Key": "dequeue-1"}
        taken = [await http.post(f"{r.url}/api/v1/dequeue", json={}, headers=dq) for r in (b, a)]
        assert taken[0].json()["attempt"]["attempt_id"] == taken[1].json()["attempt"]["attempt_id"]

        # First tries and retries at the same moment on both replicas: each key's write runs once.
        keys = [f"race-{i}" for i in range(8)]
        answers = await asyncio.gather(*(
            http.post(f"{r.url}/api/v1/rollouts", json={"input": k}, headers={"Idempotency-Key": k})
            for k in keys for r in (a, b)
        ))  # fmt: skip
        for i in range(len(keys)):
            assert answers[2 * i].content == answers[2 * i + 1].content
    async with b.store() as admin_b:
        rollouts = await admin_b.query_rollouts(limit=100)
    assert sorted(str(r.input) for r in rollouts) == sorted(["1", "2", *keys])
    assert [r.status for r in rollouts].count(RolloutStatus.running) == 1


async def test_the_sweep_ends_an_abandoned_attempt_once_across_replicas(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    config = RolloutConfig(unresponsive_s=1, max_attempts=2, retry_on=["unresponsive"])
    async with a.store() as admin_a, b.store(RUNNER) as runner_b:
        rollouts = await admin_a.enqueue_rollouts([{"input": i, "config": config} for i in range(4)])
        for _ in rollouts:  # taken through B, then the runner goes silent
            assert await runner_b.dequeue_rollout(worker_id="w-gone") is not None

        def changed() -> float:
            return a.metric("kiln_sweep_changed_attempts_total") + b.metric("kiln_sweep_changed_attempts_total")

        await _wait_for("the sweep to end the abandoned attempts", lambda: changed() >= len(rollouts))
        runs = a.metric("kiln_sweep_runs_total"), b.metric("kiln_sweep_runs_total")
        await asyncio.sleep(2.5)  # both replicas sweep twice more: nothing left to judge
        assert changed() == len(rollouts)  # each attempt ended once, summed over both replicas' reports
        assert a.metric("kiln_sweep_runs_total") > runs[0] and b.metric("kiln_sweep_runs_total") > runs[1]

        for rollout in rollouts:
            attempts = await admin_a.query_attempts(rollout.rollout_id)
            assert [(x.sequence_id, x.status) for x in attempts] == [(1, AttemptStatus.unresponsive)]
            assert (await admin_a.get_rollout(rollout.rollout_id)).status == RolloutStatus.requeuing


async def test_a_stored_response_is_continued_read_and_deleted_across_replicas(
    replicas: tuple[Replica, Replica],
) -> None:
    """Responses API state lives in the shared store: created on A, continued and deleted on B (issue 19)."""
    import openai

    a, b = replicas
    async with a.store() as admin_a, b.store() as admin_b, b.store(RUNNER) as runner_b:
        mine = await admin_a.enqueue_rollout({"q": "chat"})
        await admin_a.enqueue_rollout({"q": "other"})
        got = await runner_b.dequeue_rollout(worker_id="w-1")
        other = await runner_b.dequeue_rollout(worker_id="w-2")
        assert got is not None and other is not None and got.rollout.rollout_id == mine.rollout_id
        rid = mine.rollout_id

        def agent(replica: Replica, held=got) -> openai.OpenAI:  # type: ignore[no-untyped-def]
            url = attempt_base_url(replica.url, held.rollout.rollout_id, held.attempt.attempt_id)
            return openai.OpenAI(base_url=url, api_key=held.token, max_retries=0)

        on_a, on_b = agent(a), agent(b)
        r1 = on_a.responses.create(model="tiny", input="Asked on A", max_output_tokens=4)
        r2 = on_b.responses.create(model="tiny", input="Asked on B", previous_response_id=r1.id, max_output_tokens=4)
        spans = await admin_b.query_spans(rid, name=SpanNames.llm_call)
        [second] = [s for s in spans if s.attributes[SpanAttrs.call_id] == r2.id]
        prompt = [m["content"] for m in second.attributes[SpanAttrs.request]["messages"]]
        assert prompt == ["Asked on A", r1.output_text, "Asked on B"]
        assert on_b.responses.retrieve(r1.id).output_text == r1.output_text
        assert on_a.responses.retrieve(r2.id).previous_response_id == r1.id
        with pytest.raises(openai.NotFoundError):  # another attempt's token: as if it did not exist
            agent(b, other).responses.retrieve(r1.id)

        on_b.responses.delete(r1.id)
        with pytest.raises(openai.NotFoundError):
            on_a.responses.retrieve(r1.id)
        with pytest.raises(openai.NotFoundError):
            on_a.responses.create(model="tiny", input="again", previous_response_id=r1.id, max_output_tokens=4)
        assert on_a.responses.retrieve(r2.id).id == r2.id  # its continuation is a record of its own
