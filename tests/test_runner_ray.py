"""Runners as Ray actors on a local Ray cluster, against a real loopback server.

One Ray instance serves the module (a few seconds to start); each test starts its own
actors through RayRunner, as `kiln run --ray` and `Trainer(runners="ray")` do.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest
import ray

from agentkiln.models import AttemptStatus, FailureKind, RolloutConfig, RolloutStatus
from agentkiln.protocol import SpanAttrs, SpanNames
from agentkiln.runner.ray_runner import RayActorOptions, RayRunner
from agentkiln.runner.sidecar import CommandAgent
from agentkiln.training.context import Algorithm, TrainingResult
from tests.test_runner_integration import API_KEY, FAST, client, server, wait_until  # noqa: F401 (fixtures)


SMALL = RayActorOptions(num_cpus=0.5)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


def ray_runner(agent, url, **kw) -> RayRunner:
    kw.setdefault("config", FAST)
    kw.setdefault("options", SMALL)
    return RayRunner(agent, url, api_key=API_KEY, **kw)


async def test_ray_actors_complete_rollouts(server, client):
    ids = [(await client.enqueue_rollout({"n": i})).rollout_id for i in range(4)]
    done = await asyncio.to_thread(
        ray_runner("tests.runner_test_agents:PidAgent", server, n_workers=2, until_empty=True).run
    )
    assert done == 4
    pids = set()
    for i, rid in enumerate(ids):
        assert (await client.get_rollout(rid)).status == RolloutStatus.succeeded
        (obj,) = await client.query_spans(rid, name=SpanNames.object)
        pids.add(obj.attributes["kiln.object.value"]["pid"])
        (reward,) = await client.query_spans(rid, name=SpanNames.reward)
        assert reward.attributes[SpanAttrs.reward_value] == float(i)
    assert os.getpid() not in pids  # run in Ray's worker processes, not here
    workers = await client.query_workers()
    assert len(workers) == 2 and all(w.worker_id.startswith("ray-") and w.status.value == "stopped" for w in workers)


async def test_killed_actor_attempt_is_requeued_and_completed_by_another(server, client):
    # 5 s (25 missed heartbeats) before a silent attempt counts as lost: on 2 loaded cores a live actor's
    # heartbeat thread was once starved past 1 s and its attempt requeued before the kill.
    cfg = RolloutConfig(unresponsive_s=5.0, max_attempts=2, retry_on=[FailureKind.unresponsive])
    r = await client.enqueue_rollout({"q": "x"}, config=cfg)
    runner = ray_runner("tests.runner_test_agents:hang_first", server, n_workers=2)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:

        async def first_attempt_running():
            return bool(await client.query_spans(r.rollout_id, name=SpanNames.reward))

        await wait_until(first_attempt_running, timeout=60)
        (first,) = await client.query_attempts(r.rollout_id)
        doomed = runner.actor_of(first.worker_id)
        ray.kill(doomed, no_restart=True)  # the Ray worker process dies mid-rollout

        async def succeeded():
            return (await client.get_rollout(r.rollout_id)).status == RolloutStatus.succeeded

        await wait_until(succeeded, timeout=60)
        first, second = await client.query_attempts(r.rollout_id)
        assert first.status == AttemptStatus.unresponsive and first.error.kind == FailureKind.unresponsive
        assert second.status == AttemptStatus.succeeded and second.worker_id != first.worker_id
        assert runner.lost == 1
        await wait_until(lambda: asyncio.sleep(0, len(runner.actors()) == 2))  # the lost actor was replaced
    finally:
        runner.stop()
        await asyncio.to_thread(thread.join, 30)
    assert not thread.is_alive()


async def test_budget_is_shared_by_all_actors(server, client):
    ids = [(await client.enqueue_rollout({"n": i})).rollout_id for i in range(5)]
    done = await asyncio.to_thread(
        ray_runner("tests.runner_test_agents:simple", server, n_workers=3, max_rollouts=3).run
    )
    assert done == 3
    statuses = [(await client.get_rollout(rid)).status for rid in ids]
    assert statuses.count(RolloutStatus.succeeded) == 3 and statuses.count(RolloutStatus.queuing) == 2


async def test_sidecar_agent_on_ray_gets_its_pass_env(server, client, monkeypatch):
    monkeypatch.setenv("KILN_TEST_REWARD", "0.75")
    monkeypatch.setenv("KILN_TEST_SECRET", "not-passed")
    script = "import os; print('KILN_REWARD=' + os.environ['KILN_TEST_REWARD']); assert 'KILN_TEST_SECRET' not in os.environ"
    agent = CommandAgent([sys.executable, "-c", script], pass_env=["KILN_TEST_REWARD"])
    r = await client.enqueue_rollout({"q": "x"})
    done = await asyncio.to_thread(ray_runner(agent, server, n_workers=1, until_empty=True).run)
    assert done == 1
    assert (await client.get_rollout(r.rollout_id)).status == RolloutStatus.succeeded
    (reward,) = await client.query_spans(r.rollout_id, name=SpanNames.reward)
    assert reward.attributes[SpanAttrs.reward_value] == 0.75


class _EnqueueAndWait(Algorithm):
    """The smallest algorithm: enqueue the tasks, wait for them, report the mean reward."""

    async def run(self, ctx, train_data, val_data=None):
        rollouts = await ctx.store.enqueue_rollouts([{"input": task} for task in train_data])
        done = await ctx.store.wait_for_rollouts([r.rollout_id for r in rollouts], timeout=120)
        return TrainingResult(extra={"statuses": [r.status.value for r in done]})


def test_trainer_runners_ray(tmp_path):
    from agentkiln.trainer import Trainer

    trainer = Trainer(
        _EnqueueAndWait(), n_runners=2, engine="tiny", run_dir=tmp_path / "run", runners="ray", ray_options=SMALL
    )
    result = trainer.fit("tests.runner_test_agents:simple", [{"n": i} for i in range(3)])
    assert result.extra["statuses"] == ["succeeded"] * 3


def test_unknown_runners_kind_is_refused():
    from agentkiln.trainer import Trainer

    with pytest.raises(ValueError, match="runners"):
        Trainer(_EnqueueAndWait(), runners="k8s")


async def test_kiln_run_ray_cli(server, client):
    from typer.testing import CliRunner

    import agentkiln.cli.run  # noqa: F401 (adds `kiln run` to the app)
    from agentkiln.cli.app import app

    ids = [(await client.enqueue_rollout({"n": i})).rollout_id for i in range(2)]
    args = ["run", "tests.runner_test_agents:simple", "--ray", "-n", "2", "--until-empty", "--ray-num-cpus", "0.5"]
    result = await asyncio.to_thread(
        CliRunner().invoke, app, [*args, "--server", server, "--heartbeat-s", "0.2"], env={"KILN_RUNNER_KEY": API_KEY}
    )
    assert result.exit_code == 0, result.output
    assert "2 attempt(s) run" in result.output
    assert [(await client.get_rollout(rid)).status for rid in ids] == [RolloutStatus.succeeded] * 2
    bad = CliRunner().invoke(app, [*args, "--server", server, "--ray-resource", "gpu_host=lots"])
    assert bad.exit_code == 2 and "NAME=AMOUNT" in bad.output
