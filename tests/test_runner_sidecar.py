"""Sidecar agents: any command per rollout, reward from stdout, failures, timeouts."""

from __future__ import annotations

import asyncio
import sys
import textwrap

import pytest

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
from agentkiln.store.memory import InMemoryStore

FAST = WorkerConfig(
    poll_interval_s=0.02, heartbeat_s=0.05, flush_interval_s=0.02, cancel_grace_s=3.0, gateway_url="http://gw:7"
)


@pytest.fixture
def store() -> InMemoryStore:
    return InMemoryStore(sweep_interval_s=None)


async def run_all(agent, store) -> None:
    await Runner(agent, store, mode="thread", n_workers=1, until_empty=True, config=FAST).arun()


async def final_rewards(store, rid):
    spans = await store.query_spans(rid, name=SpanNames.reward)
    return [s.attributes[SpanAttrs.reward_value] for s in spans]


async def test_bash_sidecar_reads_task_and_env(store, tmp_path):
    await store.add_resources(ResourcesIn(llms={"main": LLMEndpoint(model="tiny")}))
    script = tmp_path / "agent.sh"
    script.write_text(
        textwrap.dedent(
            """\
            #!/usr/bin/env bash
            set -euo pipefail
            task=$(cat)
            echo "task=$task env=$KILN_TASK"
            echo "base=$OPENAI_BASE_URL model=$KILN_MODEL rid=$KILN_ROLLOUT_ID aid=$KILN_ATTEMPT_ID"
            echo "otel=$OTEL_RESOURCE_ATTRIBUTES"
            echo "KILN_REWARD=0.25"
            echo "KILN_REWARD=0.75"
            """
        )
    )
    script.chmod(0o755)
    lines: list[str] = []
    r = await store.enqueue_rollout({"q": "2+2"})
    await run_all(CommandAgent(str(script), on_line=lines.append), store)
    (att,) = await store.query_attempts(r.rollout_id)
    assert att.status == AttemptStatus.succeeded, att.error
    assert await final_rewards(store, r.rollout_id) == [0.75]  # the last KILN_REWARD line counts
    assert lines[0] == 'task={"q": "2+2"} env={"q": "2+2"}'
    base = f"http://gw:7/rollout/{r.rollout_id}/attempt/{att.attempt_id}/v1"
    assert lines[1] == f"base={base} model=tiny rid={r.rollout_id} aid={att.attempt_id}"
    assert lines[2] == f"otel=kiln.rollout_id={r.rollout_id},kiln.attempt_id={att.attempt_id}"
    (side,) = await store.query_spans(r.rollout_id, name="kiln.sidecar")
    assert side.attributes["kiln.sidecar.exit_code"] == 0


async def test_node_sidecar_multi_dimensional_reward(store):
    js = "let d='';process.stdin.on('data',c=>d+=c).on('end',()=>{const t=JSON.parse(d);" \
         "console.log('KILN_REWARD='+JSON.stringify({correct:t.n*0.5,format:0.25}))})"  # fmt: skip
    r = await store.enqueue_rollout({"n": 1})
    await run_all(CommandAgent(["node", "-e", js]), store)
    (span,) = await store.query_spans(r.rollout_id, name=SpanNames.reward)
    assert span.attributes[SpanAttrs.reward_value] == 0.75
    assert span.attributes[SpanAttrs.reward_dims] == {"correct": 0.5, "format": 0.25}


async def test_nonzero_exit_is_agent_exception_with_stderr(store):
    r = await store.enqueue_rollout("x")
    await run_all(CommandAgent("echo starting; echo 'KeyError: answer' >&2; exit 3"), store)
    (att,) = await store.query_attempts(r.rollout_id)
    assert att.status == AttemptStatus.failed and att.error.kind == FailureKind.agent_exception
    assert "code 3" in att.error.message and "KeyError: answer" in att.error.message


async def test_named_failure_kind_is_retried(store):
    cmd = f"""{sys.executable} -c "import os,sys
if os.environ['KILN_ATTEMPT_NUMBER'] == '1':
    print('KILN_FAILURE=tool_error'); sys.exit(1)
print('KILN_REWARD=1')" """
    r = await store.enqueue_rollout("x", config=RolloutConfig(max_attempts=2, retry_on=[FailureKind.tool_error]))
    await run_all(CommandAgent(cmd), store)
    atts = await store.query_attempts(r.rollout_id)
    assert [a.status for a in atts] == [AttemptStatus.failed, AttemptStatus.succeeded]
    assert atts[0].error.kind == FailureKind.tool_error
    assert (await store.get_rollout(r.rollout_id)).status == RolloutStatus.succeeded


async def test_timeout_kills_process_group(store, tmp_path):
    pidfile = tmp_path / "child.pid"
    # The shell starts a background grandchild; both must die when the attempt times out.
    cmd = f"sleep 30 & echo $! > {pidfile}; wait"
    r = await store.enqueue_rollout("x", config=RolloutConfig(timeout_s=0.5))
    await run_all(CommandAgent(cmd, kill_grace_s=0.5), store)
    (att,) = await store.query_attempts(r.rollout_id)
    assert att.status == AttemptStatus.timeout and att.error.kind == FailureKind.timeout
    child = int(pidfile.read_text())
    for _ in range(100):
        if not alive(child):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("grandchild process survived the timeout")


def alive(pid: int) -> bool:
    """Running and not a zombie (a killed orphan may wait a while for its reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_bad_reward_line(store):
    r = await store.enqueue_rollout("x")
    await run_all(CommandAgent("echo KILN_REWARD=lots"), store)
    (att,) = await store.query_attempts(r.rollout_id)
    assert att.status == AttemptStatus.failed and "KILN_REWARD" in att.error.message
