"""Runners against a real loopback server: worker processes, SIGKILL recovery, gateway, sidecar, CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest
from typer.testing import CliRunner

from agentkiln.gateway.router import build_gateway_router
from agentkiln.models import (
    AttemptStatus,
    FailureKind,
    LLMEndpoint,
    ResourcesIn,
    RolloutConfig,
    RolloutStatus,
)
from agentkiln.protocol import SpanAttrs, SpanNames
from agentkiln.runner.runner import Runner
from agentkiln.runner.sidecar import CommandAgent
from agentkiln.runner.worker import WorkerConfig
from agentkiln.server.app import create_app
from agentkiln.server.otlp import build_otlp_router
from agentkiln.server.serve import ServerThread
from agentkiln.store.client import HttpStore
from agentkiln.store.sqlite import SqliteStore

API_KEY = "secret"
FAST = WorkerConfig(poll_interval_s=0.05, heartbeat_s=0.2, flush_interval_s=0.05, cancel_grace_s=0.5)


def _has_route(app, path: str) -> bool:
    return any(getattr(r, "path", "") == path for r in app.routes)


@pytest.fixture
def server(tmp_path):
    from gateway_fakes import ScriptedEngine

    store = SqliteStore(tmp_path / "kiln.db", sweep_interval_s=None)
    app = create_app(store, api_key=API_KEY, sweep_interval_s=0.2)
    app.state.engine = ScriptedEngine(lambda req: "4" if "2+2" in str(req.messages) else "?")
    if not _has_route(app, "/v1/traces"):
        app.include_router(build_otlp_router())
    if not _has_route(app, "/v1/chat/completions"):
        app.include_router(build_gateway_router())
    thread = ServerThread(app)
    url = thread.start()
    yield url
    thread.stop()


@pytest.fixture
async def client(server):
    store = HttpStore(server, api_key=API_KEY)
    yield store
    await store.close()


async def wait_until(pred, timeout=20.0, interval=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if await pred():
            return
        await asyncio.sleep(interval)
    raise AssertionError("condition not met in time")


def runner(agent, url, **kw) -> Runner:
    kw.setdefault("config", FAST)
    return Runner(agent, url, api_key=API_KEY, **kw)


async def test_killed_worker_process_is_unresponsive_then_retried(server, client):
    cfg = RolloutConfig(unresponsive_s=1.0, max_attempts=2, retry_on=[FailureKind.unresponsive])
    r = await client.enqueue_rollout({"q": "x"}, config=cfg)
    doomed = runner("runner_test_agents:hang_first", server, n_workers=1, mode="process")
    t = threading.Thread(target=doomed.run, daemon=True)
    t.start()

    async def started():
        return bool(await client.query_spans(r.rollout_id, name=SpanNames.reward))

    await wait_until(started, timeout=60)  # includes the spawned process's start-up
    os.kill(doomed._procs[0].pid, signal.SIGKILL)
    await asyncio.to_thread(t.join, 10)

    async def requeued():
        return (await client.get_rollout(r.rollout_id)).status == RolloutStatus.requeuing

    await wait_until(requeued)
    done = await runner("runner_test_agents:hang_first", server, n_workers=1, mode="thread", until_empty=True).arun()
    assert done == 1
    assert (await client.get_rollout(r.rollout_id)).status == RolloutStatus.succeeded
    first, second = await client.query_attempts(r.rollout_id)
    assert first.status == AttemptStatus.unresponsive and first.error.kind == FailureKind.unresponsive
    assert second.status == AttemptStatus.succeeded
    # The killed attempt's spans stay stored under its own attempt id; only the succeeded one counts.
    killed = await client.query_spans(r.rollout_id, attempt_id=first.attempt_id)
    assert [s.name for s in killed] == [SpanNames.message, SpanNames.reward]
    assert killed[1].attributes[SpanAttrs.reward_final] is False
    good = await client.query_spans(r.rollout_id, attempt_id=second.attempt_id, name=SpanNames.reward)
    assert [(s.attributes[SpanAttrs.reward_value], s.attributes[SpanAttrs.reward_final]) for s in good] == [(1.0, True)]


async def test_process_workers_run_class_agent_setup_once_each(server, client):
    ids = [(await client.enqueue_rollout({"n": i})).rollout_id for i in range(4)]
    done = await asyncio.to_thread(
        runner("runner_test_agents:PidAgent", server, n_workers=2, mode="process", until_empty=True).run
    )
    assert done == 4
    pids = set()
    for i, rid in enumerate(ids):
        assert (await client.get_rollout(rid)).status == RolloutStatus.succeeded
        (obj,) = await client.query_spans(rid, name=SpanNames.object)
        assert obj.attributes["kiln.object.value"]["setups"] == 1
        pids.add(obj.attributes["kiln.object.value"]["pid"])
        (rew,) = await client.query_spans(rid, name=SpanNames.reward)
        assert rew.attributes[SpanAttrs.reward_value] == float(i)
    assert os.getpid() not in pids
    workers = await client.query_workers()
    assert len(workers) == 2 and all(w.status.value == "stopped" for w in workers)


async def test_agent_llm_calls_go_through_attempt_gateway(server, client):
    await client.add_resources(ResourcesIn(llms={"main": LLMEndpoint(model="scripted", sampling={"max_tokens": 8})}))
    r = await client.enqueue_rollout({"q": "2+2=?", "expect": "4"})
    await runner("runner_test_agents:chat", server, n_workers=1, mode="thread", until_empty=True).arun()
    (att,) = await client.query_attempts(r.rollout_id)
    assert att.status == AttemptStatus.succeeded, att.error
    spans = await client.query_spans(r.rollout_id, attempt_id=att.attempt_id)
    assert [s.name for s in spans] == [SpanNames.llm_call, SpanNames.reward]
    assert spans[1].attributes[SpanAttrs.reward_value] == 1.0


async def test_sidecar_posts_span_over_http_and_reports_reward(server, client):
    script = (
        'curl -sf -X POST "$KILN_SERVER_URL/api/v1/spans" -H "Authorization: Bearer $KILN_API_KEY" '
        "-H 'Content-Type: application/json' "
        '-d "[{\\"rollout_id\\":\\"$KILN_ROLLOUT_ID\\",\\"attempt_id\\":\\"$KILN_ATTEMPT_ID\\",'
        '\\"name\\":\\"kiln.message\\",\\"attributes\\":{\\"kiln.message.text\\":\\"from bash\\"}}]" >/dev/null '
        "&& echo KILN_REWARD=0.9"
    )
    r = await client.enqueue_rollout({"q": "x"})
    await runner(CommandAgent(script), server, n_workers=1, mode="thread", until_empty=True).arun()
    (att,) = await client.query_attempts(r.rollout_id)
    assert att.status == AttemptStatus.succeeded, att.error
    names = [s.name for s in await client.query_spans(r.rollout_id)]
    assert names == [SpanNames.message, "kiln.sidecar", SpanNames.reward]


def test_cli_run_and_dev(server):
    import importlib

    from agentkiln.cli.app import app
    from agentkiln.cli.main import COMMAND_MODULES

    for module in COMMAND_MODULES:
        if module.startswith("agentkiln.cli.") and module.rsplit(".", 1)[1] in ("run", "dev"):
            importlib.import_module(module)
    env = {"KILN_API_KEY": API_KEY, "KILN_SERVER_URL": server}

    async def enqueue():
        async with HttpStore(server, api_key=API_KEY) as s:
            return (await s.enqueue_rollout("t")).rollout_id

    rid = asyncio.run(enqueue())
    cli = CliRunner()
    res = cli.invoke(app, ["run", "runner_test_agents:simple", "--mode", "thread", "-n", "1", "--until-empty"], env=env)
    assert res.exit_code == 0, res.output
    assert "1 attempt(s) run" in res.output

    async def status():
        async with HttpStore(server, api_key=API_KEY) as s:
            return (await s.get_rollout(rid)).status

    assert asyncio.run(status()) == RolloutStatus.succeeded

    res = cli.invoke(app, ["dev", "runner_test_agents:simple", "--task", '{"q": 1}'], env=env)
    assert res.exit_code == 0, res.output
    assert "kiln.message" in res.output and "solving" in res.output and "succeeded" in res.output
    assert "reward: 0.5" in res.output

    res = cli.invoke(app, ["run", "--server", server], env=env)
    assert res.exit_code != 0  # neither AGENT_REF nor --command


async def test_process_runner_stops_gracefully(server, client):
    proc_runner = runner("runner_test_agents:simple", server, n_workers=1, mode="process")
    t = threading.Thread(target=proc_runner.run, daemon=True)
    t.start()
    r = await client.enqueue_rollout("t")

    async def finished():
        return (await client.get_rollout(r.rollout_id)).status == RolloutStatus.succeeded

    await wait_until(finished, timeout=60)
    proc_runner.stop()
    await asyncio.to_thread(t.join, 15)
    assert not t.is_alive() and proc_runner._procs[0].exitcode == 0


async def test_killed_attempt_never_reaches_training_twice(server, client):
    """SIGKILL mid-rollout after an LLM call: the retry succeeds and only its calls become transitions."""
    from agentkiln.adapter.transitions import SkipReason, build_batch

    await client.add_resources(ResourcesIn(llms={"main": LLMEndpoint(model="scripted")}))
    cfg = RolloutConfig(unresponsive_s=1.0, max_attempts=2, retry_on=[FailureKind.unresponsive])
    r = await client.enqueue_rollout({"q": "2+2"}, config=cfg)
    doomed = runner("runner_test_agents:call_then_hang_first", server, n_workers=1, mode="process")
    t = threading.Thread(target=doomed.run, daemon=True)
    t.start()

    async def called():
        return bool(await client.query_spans(r.rollout_id, name=SpanNames.reward))

    await wait_until(called, timeout=60)
    os.kill(doomed._procs[0].pid, signal.SIGKILL)
    await asyncio.to_thread(t.join, 10)

    async def requeued():
        return (await client.get_rollout(r.rollout_id)).status == RolloutStatus.requeuing

    await wait_until(requeued)
    await runner("runner_test_agents:call_then_hang_first", server, n_workers=1, mode="thread", until_empty=True).arun()
    rollout = await client.get_rollout(r.rollout_id)
    attempts = await client.query_attempts(r.rollout_id)
    spans = await client.query_spans(r.rollout_id)
    assert rollout.status == RolloutStatus.succeeded
    assert len([s for s in spans if s.name == SpanNames.llm_call]) == 2  # one per attempt, both stored

    transitions, report = build_batch([(rollout, attempts, spans)])
    assert len(transitions) == 1
    assert transitions[0].attempt_id == attempts[1].attempt_id and transitions[0].return_ == 1.0
    assert [(s.attempt_id, s.reason) for s in report] == [(attempts[0].attempt_id, SkipReason.stale_attempt)]


async def test_thread_workers_share_a_client_per_25(server, client, monkeypatch):
    """Thread mode against a URL opens one HttpStore per 25 workers, not one for all (httpx pool cost)."""
    import agentkiln.runner.runner as runner_module

    opened = []
    real_open = runner_module.open_runner_store

    def counting(url, api_key=None):
        opened.append(url)
        return real_open(url, api_key)

    monkeypatch.setattr(runner_module, "open_runner_store", counting)
    ids = [(await client.enqueue_rollout({"n": i})).rollout_id for i in range(3)]
    done = await runner("runner_test_agents:simple", server, n_workers=30, mode="thread", until_empty=True).arun()
    assert done == 3 and len(opened) == 2
    assert [(await client.get_rollout(rid)).status for rid in ids] == [RolloutStatus.succeeded] * 3
