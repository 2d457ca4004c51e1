"""Runner/worker behaviour against the in-memory store: rewards, failures, retries, timeouts, loops."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

import agentkiln.runner as kr
from agentkiln.models import (
    AttemptStatus,
    FailureKind,
    LLMEndpoint,
    PromptTemplate,
    ResourcesIn,
    RolloutConfig,
    RolloutStatus,
    SpanIn,
    SpanStatus,
)
from agentkiln.protocol import SpanAttrs, SpanNames
from agentkiln.runner.failures import LoopDetected, ToolError, classify
from agentkiln.runner.runner import Runner
from agentkiln.runner.worker import WorkerConfig
from agentkiln.store.memory import InMemoryStore

FAST = WorkerConfig(poll_interval_s=0.02, heartbeat_s=0.05, flush_interval_s=0.02, cancel_grace_s=0.2)


@pytest.fixture
def store() -> InMemoryStore:
    return InMemoryStore(sweep_interval_s=None)


async def run_all(agent, store, n_workers: int = 1, **kwargs) -> int:
    kwargs.setdefault("config", FAST)
    return await Runner(agent, store, mode="thread", n_workers=n_workers, until_empty=True, **kwargs).arun()


async def spans_of(store, rollout_id, attempt_id=None, name=None):
    return await store.query_spans(rollout_id, attempt_id=attempt_id, name=name)


def rewards(spans):
    return [
        (s.attributes[SpanAttrs.reward_value], s.attributes[SpanAttrs.reward_final])
        for s in spans
        if s.name == SpanNames.reward
    ]


async def test_sync_agent_return_value_is_final_reward(store):
    @kr.rollout
    def agent(task):
        return 1.0 if task["q"] == "2+2" else 0.0

    r = await store.enqueue_rollout({"q": "2+2"})
    assert await run_all(agent, store) == 1
    assert (await store.get_rollout(r.rollout_id)).status == RolloutStatus.succeeded
    (att,) = await store.query_attempts(r.rollout_id)
    assert att.status == AttemptStatus.succeeded and att.worker_id
    assert rewards(await spans_of(store, r.rollout_id)) == [(1.0, True)]


async def test_async_agent_intermediate_rewards_from_nested_function(store):
    def score_step(i: int) -> None:  # deep in the agent's call stack, no handle passed
        kr.emit_reward(0.1 * i, final=False)

    @kr.rollout
    async def agent(task, rollout, attempt):
        for i in range(1, 3):
            await asyncio.sleep(0)
            score_step(i)
        kr.emit_message(f"done {rollout.rollout_id} #{attempt.sequence_id}")
        kr.emit_object({"answer": 4, "steps": (1, 2)})
        kr.emit_reward({"correct": 1.0, "format": -0.25})

    r = await store.enqueue_rollout("t")
    await run_all(agent, store)
    spans = await spans_of(store, r.rollout_id)
    assert rewards(spans) == [(pytest.approx(0.1), False), (pytest.approx(0.2), False), (0.75, True)]
    dims = [s.attributes.get(SpanAttrs.reward_dims) for s in spans if s.name == SpanNames.reward]
    assert dims[-1] == {"correct": 1.0, "format": -0.25}
    (msg,) = [s for s in spans if s.name == SpanNames.message]
    assert msg.attributes[SpanAttrs.message_text] == f"done {r.rollout_id} #1"
    (obj,) = [s for s in spans if s.name == SpanNames.object]
    assert obj.attributes["kiln.object.value"] == {"answer": 4, "steps": [1, 2]}
    assert len({s.trace_id for s in spans}) == 1


async def test_primary_dimension_wins(store):
    r = await store.enqueue_rollout(None)
    await run_all(kr.rollout(lambda task: {"primary": 0.5, "length": 3.0}), store)
    assert rewards(await spans_of(store, r.rollout_id)) == [(0.5, True)]


async def test_reward_survives_crash_and_failure_is_classified(store):
    @kr.rollout
    def agent(task):
        kr.emit_reward(0.3, final=False)
        raise ToolError("calculator exploded")

    r = await store.enqueue_rollout(1)
    await run_all(agent, store)
    (att,) = await store.query_attempts(r.rollout_id)
    assert att.status == AttemptStatus.failed
    assert att.error.kind == FailureKind.tool_error
    assert att.error.type == "agentkiln.runner.failures.ToolError"
    assert "calculator exploded" in att.error.message and "Traceback" in att.error.stack
    spans = await spans_of(store, r.rollout_id)
    assert rewards(spans) == [(0.3, False)]
    (exc,) = [s for s in spans if s.name == SpanNames.exception]
    assert exc.attributes[SpanAttrs.failure_kind] == "tool_error"
    assert (await store.get_rollout(r.rollout_id)).status == RolloutStatus.failed


async def test_retry_on_kind_requeues_then_succeeds(store):
    @kr.rollout
    def flaky(task, attempt):
        if attempt.sequence_id == 1:
            raise openai.APIConnectionError(request=httpx.Request("POST", "http://x/v1/chat/completions"))
        return 1.0

    cfg = RolloutConfig(max_attempts=3, retry_on=[FailureKind.llm_error])
    retried = await store.enqueue_rollout("a", config=cfg)
    not_retried = await store.enqueue_rollout("b", config=RolloutConfig(max_attempts=3, retry_on=[FailureKind.loop]))
    await run_all(flaky, store)
    atts = await store.query_attempts(retried.rollout_id)
    assert [a.status for a in atts] == [AttemptStatus.failed, AttemptStatus.succeeded]
    assert atts[0].error.kind == FailureKind.llm_error
    assert (await store.get_rollout(retried.rollout_id)).status == RolloutStatus.succeeded
    assert (await store.get_rollout(not_retried.rollout_id)).status == RolloutStatus.failed
    # Only the succeeded attempt's spans carry the reward used for training.
    assert rewards(await spans_of(store, retried.rollout_id, attempt_id=atts[1].attempt_id)) == [(1.0, True)]
    assert rewards(await spans_of(store, retried.rollout_id, attempt_id=atts[0].attempt_id)) == []


@pytest.mark.parametrize("is_async", [False, True])
async def test_local_timeout(store, is_async):
    if is_async:

        async def slow(task):
            await asyncio.sleep(30)

    else:

        def slow(task):
            kr.emit_message("working")
            time.sleep(1.0)
            kr.emit_message("too late")  # the attempt is over: dropped

    cfg = RolloutConfig(timeout_s=0.3, max_attempts=2, retry_on=[FailureKind.timeout])
    r = await store.enqueue_rollout("x", config=cfg)
    await run_all(kr.rollout(slow), store)
    atts = await store.query_attempts(r.rollout_id)
    assert [a.status for a in atts] == [AttemptStatus.timeout, AttemptStatus.timeout]
    assert all(a.error.kind == FailureKind.timeout for a in atts)
    assert (await store.get_rollout(r.rollout_id)).status == RolloutStatus.failed
    if not is_async:
        await asyncio.sleep(1.0)  # let the abandoned threads finish
        texts = [s.attributes[SpanAttrs.message_text] for s in await spans_of(store, r.rollout_id, name=SpanNames.message)]
        assert texts == ["working", "working"]


async def test_loop_guard_stops_repeating_agent(store):
    @kr.rollout
    async def looper(task):
        for _ in range(200):  # stands in for the gateway recording identical calls
            kr.emit_span(
                SpanNames.llm_call,
                {
                    SpanAttrs.request: {"messages": [{"role": "user", "content": "hi"}]},
                    SpanAttrs.response: {"choices": [{"message": {"content": "again"}}]},
                },
            )
            await asyncio.sleep(0.02)
        return 1.0

    r = await store.enqueue_rollout("x", metadata={"max_repeated_calls": 3})
    await run_all(looper, store)
    (att,) = await store.query_attempts(r.rollout_id)
    assert att.status == AttemptStatus.failed and att.error.kind == FailureKind.loop
    assert "repeated" in att.error.message


async def test_agent_raising_loop_detected(store):
    def agent(task):
        raise LoopDetected("max turns")

    r = await store.enqueue_rollout("x")
    await run_all(agent, store)
    assert (await store.query_attempts(r.rollout_id))[0].error.kind == FailureKind.loop


class Counting(kr.Agent):
    setups = 0

    def setup(self):
        type(self).setups += 1
        self.offset = 10

    async def rollout(self, task, llm, prompts):
        await asyncio.sleep(0.01)
        assert llm.base_url.endswith("/v1") and "/rollout/" in llm.base_url
        return prompts["sys"].format(n=task) == f"n={task}" and self.offset + task


async def test_class_agent_setup_once_and_resources(store):
    await store.add_resources(
        ResourcesIn(
            llms={"main": LLMEndpoint(model="m1", sampling={"temperature": 0.5})},
            prompts={"sys": PromptTemplate(template="n={n}")},
        )
    )
    ids = [(await store.enqueue_rollout(i)).rollout_id for i in range(6)]
    n = await run_all(Counting, store, n_workers=3, gateway_url="http://gw:1")
    assert n == 6 and Counting.setups == 1
    for i, rid in enumerate(ids):
        assert rewards(await spans_of(store, rid)) == [(10.0 + i, True)]


async def test_llm_handle_points_at_attempt_route(store):
    await store.add_resources(ResourcesIn(llms={"other": LLMEndpoint(model="m0", endpoint="http://up/v1")}))
    seen = {}

    @kr.rollout
    def agent(task, llm, rollout, attempt, resources):
        seen.update(llm=llm, rid=rollout.rollout_id, aid=attempt.attempt_id, version=resources.version)
        client = llm.openai()
        assert str(client.base_url).rstrip("/") == llm.base_url
        assert llm.chat_kwargs(max_tokens=3) == {"model": "m0", "max_tokens": 3}

    await store.enqueue_rollout("x")
    await run_all(agent, store, gateway_url="http://srv:9/", api_key="k")
    llm = seen["llm"]
    assert llm.base_url == f"http://srv:9/rollout/{seen['rid']}/attempt/{seen['aid']}/v1"
    assert llm.model == "m0" and llm.api_key == "k" and seen["version"] == 1


async def test_emit_from_plain_thread_and_return_spans(store):
    @kr.rollout
    def agent(task):
        t = threading.Thread(target=lambda: kr.emit_reward(0.5, final=False))  # no context copied
        t.start()
        t.join()
        return [SpanIn(rollout_id="?", attempt_id="?", name="custom"), {"name": "custom2", "attributes": {"a": 1}}]

    r = await store.enqueue_rollout("x")
    await run_all(agent, store)
    spans = await spans_of(store, r.rollout_id)
    assert [s.name for s in spans] == [SpanNames.reward, "custom", "custom2"]
    assert spans[2].attributes == {"a": 1}


async def test_max_rollouts_budget(store):
    for i in range(5):
        await store.enqueue_rollout(i)
    runner = Runner(kr.rollout(lambda task: 1.0), store, mode="thread", n_workers=2, max_rollouts=3, config=FAST)
    assert await asyncio.wait_for(runner.arun(), 10) == 3
    assert len(await store.query_rollouts(status=[RolloutStatus.queuing])) == 2


async def test_stop_is_graceful(store):
    started = asyncio.Event()

    @kr.rollout
    async def agent(task):
        started.set()
        await asyncio.sleep(0.2)
        return 1.0

    r = await store.enqueue_rollout("x")
    runner = Runner(agent, store, mode="thread", n_workers=1, config=FAST)
    run = asyncio.create_task(runner.arun())
    await started.wait()
    runner.stop()
    assert await asyncio.wait_for(run, 5) == 1
    assert (await store.get_rollout(r.rollout_id)).status == RolloutStatus.succeeded


def test_emit_outside_rollout_is_dropped():
    assert kr.emit_reward(1.0) is None and kr.emit_message("x") is None


def test_classify():
    req = httpx.Request("GET", "http://x")
    assert classify(openai.APITimeoutError(request=req)) == FailureKind.llm_error
    assert classify(httpx.ConnectError("no", request=req)) == FailureKind.llm_error
    try:
        json.loads("{bad")
    except json.JSONDecodeError as e:
        assert classify(e) == FailureKind.parse_error
    assert classify(kr.ParseError("x")) == FailureKind.parse_error
    assert classify(ValueError("x")) == FailureKind.agent_exception
    assert classify(TimeoutError()) == FailureKind.agent_exception
    try:
        try:
            raise openai.APIConnectionError(request=req)
        except Exception as e:
            raise RuntimeError("framework wrapper") from e
    except RuntimeError as wrapped:
        assert classify(wrapped) == FailureKind.llm_error


async def test_tool_decorator_converts_errors(store):
    @kr.tool
    def search(q):
        raise TimeoutError("slow")

    @kr.tool(timeout_s=0.05)
    async def fetch(url):
        await asyncio.sleep(5)

    @kr.tool
    def add(a, b):
        return a + b

    with pytest.raises(kr.ToolTimeout):
        search("x")
    with pytest.raises(kr.ToolTimeout):
        await fetch("u")
    assert add(1, 2) == 3

    @kr.rollout
    def agent(task):
        add(1, 2)
        try:
            search("q")
        except kr.ToolError as e:
            kr.emit_exception(e)  # handled: attempt goes on
        raise kr.ToolError("fatal") from None

    r = await store.enqueue_rollout("x")
    await run_all(agent, store)
    spans = await spans_of(store, r.rollout_id)
    tools = [s for s in spans if s.name == SpanNames.tool]
    assert [t.attributes["kiln.tool.name"] for t in tools] == ["add", "search"]
    assert tools[1].attributes[SpanAttrs.failure_kind] == "tool_timeout"
    kinds = [s.attributes[SpanAttrs.failure_kind] for s in spans if s.name == SpanNames.exception]
    assert kinds == ["tool_timeout", "tool_error"]


def test_loop_guard_unit():
    def call(content, req="r"):
        return SpanIn(
            rollout_id="r",
            attempt_id="a",
            name=SpanNames.llm_call,
            attributes={
                SpanAttrs.request: {"messages": [req]},
                SpanAttrs.response: {"choices": [{"message": {"content": content, "tool_calls": None}}]},
            },
        )

    g = kr.LoopGuard(max_repeats=3)
    g.observe([call("a", "1"), call("b", "2"), call("b", "3")])
    with pytest.raises(LoopDetected):
        g.observe([call("b", "4")])
    g = kr.LoopGuard(max_repeats=None, max_llm_calls=2)
    g.observe([call("a"), call("a")])
    with pytest.raises(LoopDetected):
        g.observe([call("a")])
    assert kr.LoopGuard.from_metadata({"max_llm_calls": 7}).max_llm_calls == 7
    # n > 1 choices of one call share a call id and count once; failed calls are not loops.
    g = kr.LoopGuard(max_repeats=2)
    same_call = [
        call("a", "1").model_copy(update={"attributes": {**call("a", "1").attributes, "kiln.llm.call_id": "c1"}})
    ]
    g.observe(same_call * 4)
    assert g.calls == 1
    failed = call("x", "9").model_copy(update={"status": SpanStatus(code="ERROR")})
    g.observe([failed, failed, failed])
