"""The Store contract, run against every backend through the `store` fixture."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from agentkiln.models import (
    AttemptError,
    AttemptStatus,
    CanaryDecision,
    CanaryIn,
    CanaryStatus,
    FailureKind,
    FeedbackIn,
    LLMEndpoint,
    PromptTemplate,
    ResourcesIn,
    RolloutConfig,
    RolloutMode,
    RolloutStatus,
    Span,
    SpanIn,
    StoredResponse,
    WorkerStatus,
)
from agentkiln.models import now as wall_now
from agentkiln.protocol import SESSION_ATTEMPT_ID, SpanAttrs, SpanNames, session_rollout_id
from agentkiln.store import InvalidTransitionError, NotFoundError, SqliteStore, Store, ValidationError

S = RolloutStatus


async def test_enqueue_dequeue_fifo(store: Store) -> None:
    ids = [(await store.enqueue_rollout({"q": i}, mode=RolloutMode.train)).rollout_id for i in range(5)]
    got = []
    for _ in range(5):
        ar = await store.dequeue_rollout(worker_id="w1")
        assert ar is not None
        assert ar.rollout.status == S.running and ar.rollout.num_attempts == 1
        assert ar.attempt.status == AttemptStatus.running and ar.attempt.sequence_id == 1
        assert ar.attempt.worker_id == "w1" and ar.attempt.rollout_id == ar.rollout.rollout_id
        got.append(ar.rollout.rollout_id)
    assert got == ids
    assert await store.dequeue_rollout() is None


async def test_dequeue_empty_returns_none(store: Store) -> None:
    assert await store.dequeue_rollout() is None


async def test_enqueue_fields_round_trip(store: Store) -> None:
    cfg = RolloutConfig(timeout_s=5, max_attempts=2, retry_on=[FailureKind.timeout])
    r = await store.enqueue_rollout(
        {"question": "1+1", "nested": [1, 2.5, None]}, mode=RolloutMode.val, resources_id="res-x",
        config=cfg, metadata={"tag": "a"},
    )  # fmt: skip
    assert r.status == S.queuing and r.num_attempts == 0 and r.start_time is None
    got = await store.get_rollout(r.rollout_id)
    assert got == r
    assert got.config == cfg and got.input == {"question": "1+1", "nested": [1, 2.5, None]}


async def test_enqueue_rollouts_batch(store: Store) -> None:
    out = await store.enqueue_rollouts([{"input": i, "mode": RolloutMode.train} for i in range(3)])
    assert [r.input for r in out] == [0, 1, 2]
    assert [r.rollout_id for r in await store.query_rollouts()] == [r.rollout_id for r in out]


async def test_enqueue_rejects_unserialisable_input(store: Store) -> None:
    with pytest.raises(ValidationError):
        await store.enqueue_rollout({"x": object()})


async def test_start_rollout(store: Store) -> None:
    ar = await store.start_rollout("direct", mode=RolloutMode.test, worker_id="w9")
    assert ar.rollout.status == S.running and ar.rollout.start_time is not None
    assert ar.attempt.worker_id == "w9"
    assert await store.get_latest_attempt(ar.rollout.rollout_id) == ar.attempt
    assert await store.dequeue_rollout() is None  # not waiting


async def test_get_unknown_raises(store: Store) -> None:
    with pytest.raises(NotFoundError):
        await store.get_rollout("ro-nope")
    with pytest.raises(NotFoundError):
        await store.update_rollout("ro-nope", status=S.cancelled)
    with pytest.raises(NotFoundError):
        await store.query_attempts("ro-nope")
    with pytest.raises(NotFoundError):
        await store.get_resources("res-nope")


async def test_query_rollouts_filters_and_pages(store: Store) -> None:
    train = [await store.enqueue_rollout(i, mode=RolloutMode.train) for i in range(4)]
    val = [await store.enqueue_rollout(i, mode=RolloutMode.val) for i in range(2)]
    await store.dequeue_rollout()  # train[0] -> running
    all_ids = [r.rollout_id for r in train + val]
    assert [r.rollout_id for r in await store.query_rollouts()] == all_ids
    assert [r.rollout_id for r in await store.query_rollouts(mode=RolloutMode.val)] == [r.rollout_id for r in val]
    assert [r.rollout_id for r in await store.query_rollouts(status=[S.running])] == [train[0].rollout_id]
    queued = await store.query_rollouts(status=[S.queuing, S.running], mode=RolloutMode.train)
    assert [r.rollout_id for r in queued] == [r.rollout_id for r in train]
    picked = await store.query_rollouts(rollout_ids=[val[1].rollout_id, train[2].rollout_id, "ro-missing"])
    assert [r.rollout_id for r in picked] == [train[2].rollout_id, val[1].rollout_id]  # creation order
    assert [r.rollout_id for r in await store.query_rollouts(limit=2, offset=1)] == all_ids[1:3]
    assert await store.query_rollouts(offset=10) == []
    assert await store.query_rollouts(status=[]) == []
    with pytest.raises(ValidationError):
        await store.query_rollouts(limit=-1)


async def test_update_rollout_fields(store: Store) -> None:
    r = await store.enqueue_rollout("x")
    cfg = RolloutConfig(max_attempts=3)
    u = await store.update_rollout(
        r.rollout_id, mode=RolloutMode.val, resources_id="res-1", config=cfg, metadata={"k": 1}
    )
    assert (u.mode, u.resources_id, u.config, u.metadata, u.status) == (
        RolloutMode.val,
        "res-1",
        cfg,
        {"k": 1},
        S.queuing,
    )
    assert await store.get_rollout(r.rollout_id) == u


async def test_update_rollout_invalid_transitions(store: Store) -> None:
    r = await store.enqueue_rollout("x")
    with pytest.raises(InvalidTransitionError):
        await store.update_rollout(r.rollout_id, status=S.running)  # only via dequeue
    with pytest.raises(InvalidTransitionError):
        await store.update_rollout(r.rollout_id, status=S.succeeded)
    ar = await store.dequeue_rollout()
    assert ar is not None
    done = await store.update_rollout(r.rollout_id, status=S.succeeded)
    assert done.status == S.succeeded and done.end_time is not None
    for bad in (S.queuing, S.running, S.failed, S.requeuing):
        with pytest.raises(InvalidTransitionError):
            await store.update_rollout(r.rollout_id, status=bad)
    assert (await store.update_rollout(r.rollout_id, status=S.succeeded)).status == S.succeeded  # no-op
    assert (await store.get_latest_attempt(r.rollout_id)).status == AttemptStatus.succeeded


async def test_cancel_queued_and_running(store: Store) -> None:
    queued = await store.enqueue_rollout("q")
    running = await store.enqueue_rollout("r")
    await store.cancel_rollout(queued.rollout_id)
    ar = await store.dequeue_rollout()
    assert ar is not None and ar.rollout.rollout_id == running.rollout_id  # cancelled one is skipped
    c = await store.cancel_rollout(running.rollout_id)
    assert c.status == S.cancelled and c.end_time is not None
    attempt = await store.get_latest_attempt(running.rollout_id)
    assert attempt.status == AttemptStatus.cancelled and attempt.error.kind == FailureKind.cancelled
    with pytest.raises(InvalidTransitionError):  # the runner learns its attempt was cancelled
        await store.update_attempt(running.rollout_id, ar.attempt.attempt_id, status=AttemptStatus.succeeded)
    assert (await store.cancel_rollout(running.rollout_id)).status == S.cancelled  # idempotent
    assert await store.dequeue_rollout() is None


async def test_update_attempt_success_finishes_rollout(store: Store) -> None:
    await store.enqueue_rollout("x")
    ar = await store.dequeue_rollout()
    rid, aid = ar.rollout.rollout_id, ar.attempt.attempt_id
    hb = await store.heartbeat_attempt(rid, aid)
    assert hb.status == AttemptStatus.running and hb.last_heartbeat >= ar.attempt.last_heartbeat
    a = await store.update_attempt(rid, aid, status=AttemptStatus.succeeded, worker_id="w2")
    assert a.status == AttemptStatus.succeeded and a.end_time is not None and a.worker_id == "w2"
    r = await store.get_rollout(rid)
    assert r.status == S.succeeded and r.end_time is not None
    assert await store.query_attempts(rid) == [a]
    with pytest.raises(InvalidTransitionError):
        await store.update_attempt(rid, aid, status=AttemptStatus.failed)
    with pytest.raises(InvalidTransitionError):
        await store.heartbeat_attempt(rid, aid)


async def test_attempt_statuses(store: Store) -> None:
    queued = await store.enqueue_rollout("q")
    assert await store.attempt_statuses(queued.rollout_id) == {}  # known rollout, no attempt yet
    ar = await store.dequeue_rollout()
    rid, aid = ar.rollout.rollout_id, ar.attempt.attempt_id
    assert await store.attempt_statuses(rid) == {aid: AttemptStatus.running}
    await store.update_attempt(rid, aid, status=AttemptStatus.succeeded)
    assert await store.attempt_statuses(rid) == {aid: AttemptStatus.succeeded}
    with pytest.raises(NotFoundError):
        await store.attempt_statuses("ro-nope")


async def test_update_attempt_failure_without_retry(store: Store) -> None:
    await store.enqueue_rollout("x")
    ar = await store.dequeue_rollout()
    err = AttemptError(kind=FailureKind.agent_exception, message="boom", type="ValueError", stack="tb")
    a = await store.update_attempt(ar.rollout.rollout_id, ar.attempt.attempt_id, status=AttemptStatus.failed, error=err)
    assert a.error == err
    assert (await store.get_rollout(ar.rollout.rollout_id)).status == S.failed


async def test_update_attempt_unknown_ids(store: Store) -> None:
    r1 = await store.enqueue_rollout(1)
    await store.enqueue_rollout(2)
    a1 = await store.dequeue_rollout()
    a2 = await store.dequeue_rollout()
    with pytest.raises(NotFoundError):
        await store.update_attempt(r1.rollout_id, "at-nope", status=AttemptStatus.succeeded)
    with pytest.raises(NotFoundError):
        await store.update_attempt("ro-nope", a1.attempt.attempt_id)
    with pytest.raises(NotFoundError):  # attempt of another rollout
        await store.update_attempt(r1.rollout_id, a2.attempt.attempt_id)
    assert (await store.get_latest_attempt(r1.rollout_id)).status == AttemptStatus.running


def _span(rid: str, aid: str, name: str = "step", **attrs: object) -> SpanIn:
    return SpanIn(rollout_id=rid, attempt_id=aid, name=name, attributes=dict(attrs))


def _resend(span: Span) -> SpanIn:
    """A stored span as its producer would send it again."""
    return SpanIn.model_validate(span.model_dump(exclude={"sequence_id"}))


async def test_spans_sequence_and_queries(store: Store) -> None:
    cfg = RolloutConfig(max_attempts=2, retry_on=[FailureKind.llm_error])
    await store.enqueue_rollout("x", config=cfg)
    first = await store.dequeue_rollout()
    rid, a1 = first.rollout.rollout_id, first.attempt.attempt_id
    s1 = await store.add_span(_span(rid, a1, "kiln.llm.call", i=1))
    batch = await store.add_spans([_span(rid, a1, "kiln.reward", i=2), _span(rid, a1, "kiln.llm.call", i=3)])
    assert [s.sequence_id for s in [s1, *batch]] == [1, 2, 3]
    await store.update_attempt(rid, a1, status=AttemptStatus.failed, error=AttemptError(kind=FailureKind.llm_error))
    second = await store.dequeue_rollout()
    a2 = second.attempt.attempt_id
    assert second.attempt.sequence_id == 2
    more = await store.add_spans([_span(rid, a2, "kiln.llm.call", i=4), _span(rid, a2, "kiln.reward", i=5)])
    assert [s.sequence_id for s in more] == [1, 2]  # per attempt

    def ids(spans: list) -> list:
        return [s.attributes["i"] for s in spans]

    assert ids(await store.query_spans(rid)) == [1, 2, 3, 4, 5]
    assert ids(await store.query_spans(rid, attempt_id="latest")) == [4, 5]
    assert ids(await store.query_spans(rid, attempt_id=a1)) == [1, 2, 3]
    assert ids(await store.query_spans(rid, name="kiln.llm.call")) == [1, 3, 4]
    assert ids(await store.query_spans(rid, attempt_id=a1, name="kiln.reward")) == [2]
    assert ids(await store.query_spans(rid, limit=2, offset=2)) == [3, 4]
    got = (await store.query_spans(rid, attempt_id=a2))[0]
    assert got == more[0] and got.trace_id == more[0].trace_id and got.attempt_id == a2
    with pytest.raises(NotFoundError):
        await store.query_spans(rid, attempt_id="at-nope")
    with pytest.raises(NotFoundError):
        await store.query_spans("ro-nope")


async def test_spans_full_shape_round_trips(store: Store) -> None:
    ar = await store.start_rollout("x")
    span = SpanIn.model_validate(
        {
            "rollout_id": ar.rollout.rollout_id,
            "attempt_id": ar.attempt.attempt_id,
            "name": "kiln.llm.call",
            "parent_id": "p1",
            "start_time": 1.5,
            "end_time": 2.5,
            "attributes": {"kiln.llm.prompt_token_ids": [1, 2, 3], "nested": {"a": [True, None]}},
            "events": [{"name": "e", "timestamp": 2.0, "attributes": {"x": 1}}],
            "status": {"code": "ERROR", "description": "bad"},
            "resource": {"service.name": "agent"},
        }
    )
    stored = await store.add_span(span)
    [got] = await store.query_spans(ar.rollout.rollout_id)
    assert got == stored
    assert got.model_dump(exclude={"sequence_id"}) == span.model_dump()


async def test_spans_for_unknown_attempt_rejected_whole_batch(store: Store) -> None:
    ar = await store.start_rollout("x")
    rid, aid = ar.rollout.rollout_id, ar.attempt.attempt_id
    with pytest.raises(NotFoundError):
        await store.add_spans([_span(rid, aid), _span(rid, "at-nope")])
    assert await store.query_spans(rid) == []
    assert (await store.add_span(_span(rid, aid))).sequence_id == 1


async def test_resent_spans_not_stored_twice(store: Store) -> None:
    ar = await store.start_rollout("x")
    rid, aid = ar.rollout.rollout_id, ar.attempt.attempt_id
    batch = [_span(rid, aid, "a", i=1), _span(rid, aid, "b", i=2)]
    first = await store.add_spans(batch)
    again = await store.add_spans(batch)  # the client retries: the answer to the first send was lost
    assert again == first and [s.sequence_id for s in again] == [1, 2]
    mixed = await store.add_spans([_span(rid, aid, "c", i=3), batch[1]])
    assert [s.sequence_id for s in mixed] == [3, 2] and mixed[1] == first[1]
    assert [s.attributes["i"] for s in await store.query_spans(rid)] == [1, 2, 3]


async def test_repeated_spans_in_one_batch_collapse(store: Store) -> None:
    ar = await store.start_rollout("x")
    rid, aid = ar.rollout.rollout_id, ar.attempt.attempt_id
    a, b = _span(rid, aid, "a"), _span(rid, aid, "b")
    out = await store.add_spans([a, b, a, a.model_copy(update={"name": "a2"})])
    assert [(s.name, s.sequence_id) for s in out] == [("a", 1), ("b", 2), ("a", 1), ("a", 1)]  # first copy wins
    assert [(s.name, s.sequence_id) for s in await store.query_spans(rid)] == [("a", 1), ("b", 2)]


async def test_span_id_is_scoped_to_its_attempt(store: Store) -> None:
    cfg = RolloutConfig(max_attempts=2, retry_on=[FailureKind.llm_error])
    await store.enqueue_rollout("x", config=cfg)
    first = await store.dequeue_rollout()
    rid, a1 = first.rollout.rollout_id, first.attempt.attempt_id
    s1 = await store.add_span(_span(rid, a1))
    await store.update_attempt(rid, a1, status=AttemptStatus.failed, error=AttemptError(kind=FailureKind.llm_error))
    a2 = (await store.dequeue_rollout()).attempt.attempt_id
    s2 = await store.add_span(_span(rid, a2).model_copy(update={"span_id": s1.span_id}))
    assert (s2.attempt_id, s2.sequence_id) == (a2, 1)
    assert len(await store.query_spans(rid)) == 2


async def test_resent_batch_with_unknown_attempt_still_rejected(store: Store) -> None:
    ar = await store.start_rollout("x")
    rid, aid = ar.rollout.rollout_id, ar.attempt.attempt_id
    known = await store.add_span(_span(rid, aid))
    with pytest.raises(NotFoundError):
        await store.add_spans([_span(rid, aid), _resend(known), _span(rid, "at-nope")])
    assert await store.query_spans(rid) == [known]


async def test_span_counts_as_heartbeat_and_finished_attempts_take_no_new_spans(store: Store) -> None:
    ar = await store.start_rollout("x")
    rid, aid = ar.rollout.rollout_id, ar.attempt.attempt_id
    first = await store.add_span(_span(rid, aid))
    assert (await store.get_latest_attempt(rid)).last_heartbeat >= ar.attempt.last_heartbeat
    await store.update_attempt(rid, aid, status=AttemptStatus.succeeded)
    # A finished attempt's record is closed (issue 13): a new span is a conflict, nothing of its batch is stored.
    with pytest.raises(InvalidTransitionError, match="takes no new spans"):
        await store.add_spans([_span(rid, aid, "late-ok-looking"), _span(rid, aid, "late")])
    assert [s.name for s in await store.query_spans(rid)] == ["step"]
    # ...but a re-sent span comes back as first stored (a retried write stays idempotent).
    again = await store.add_span(_resend(first))
    assert again.sequence_id == first.sequence_id
    assert (await store.get_latest_attempt(rid)).status == AttemptStatus.succeeded


async def test_resources_versions(store: Store) -> None:
    assert await store.get_latest_resources() is None
    made = []
    for i in range(3):
        made.append(
            await store.add_resources(
                ResourcesIn(
                    llms={"main": LLMEndpoint(model=f"m{i}", sampling={"temperature": 0.5})},
                    prompts={"sys": PromptTemplate(template="v{n}", engine="f-string")},
                    metadata={"i": i},
                )
            )
        )
    assert [r.version for r in made] == [1, 2, 3]
    assert await store.get_latest_resources() == made[2]
    assert await store.get_resources(made[0].resources_id) == made[0]
    assert await store.query_resources() == made
    assert await store.query_resources(limit=1, offset=1) == [made[1]]


async def test_workers(store: Store) -> None:
    assert await store.query_workers() == []
    w = await store.heartbeat_worker("w1", status=WorkerStatus.busy, current_rollout_id="ro-1",
                                     current_attempt_id="at-1", metadata={"host": "a"})  # fmt: skip
    assert (w.status, w.current_rollout_id, w.metadata) == (WorkerStatus.busy, "ro-1", {"host": "a"})
    w2 = await store.heartbeat_worker("w1")  # plain heartbeat keeps fields
    assert w2.status == WorkerStatus.busy and w2.current_attempt_id == "at-1" and w2.last_heartbeat >= w.last_heartbeat
    w3 = await store.heartbeat_worker("w1", status=WorkerStatus.idle)
    assert w3.current_rollout_id is None and w3.metadata == {"host": "a"}
    await store.heartbeat_worker("w2")
    workers = await store.query_workers()
    assert [x.worker_id for x in workers] == ["w1", "w2"]
    assert workers[0] == w3


async def test_wait_for_rollouts_returns_when_finished(store: Store) -> None:
    r1 = await store.enqueue_rollout(1)
    r2 = await store.enqueue_rollout(2)
    a1 = await store.dequeue_rollout()
    a2 = await store.dequeue_rollout()

    async def finish() -> None:
        await asyncio.sleep(0.01)
        await store.update_attempt(r2.rollout_id, a2.attempt.attempt_id, status=AttemptStatus.succeeded)
        await asyncio.sleep(0.01)
        await store.update_attempt(r1.rollout_id, a1.attempt.attempt_id, status=AttemptStatus.failed)

    task = asyncio.create_task(finish())
    done = await store.wait_for_rollouts([r1.rollout_id, r2.rollout_id], timeout=10)
    await task
    assert [(r.rollout_id, r.status) for r in done] == [(r1.rollout_id, S.failed), (r2.rollout_id, S.succeeded)]


async def test_wait_for_rollouts_timeout_returns_finished_only(store: Store) -> None:
    r1 = await store.enqueue_rollout(1)
    r2 = await store.enqueue_rollout(2)
    await store.cancel_rollout(r2.rollout_id)
    done = await store.wait_for_rollouts([r1.rollout_id, r2.rollout_id], timeout=0.05)
    assert [r.rollout_id for r in done] == [r2.rollout_id]
    assert await store.wait_for_rollouts([], timeout=0) == []
    with pytest.raises(NotFoundError):
        await store.wait_for_rollouts(["ro-nope"], timeout=0.01)


# --------------------------------------------------------------------------- SQLite only


async def test_sqlite_resent_spans_deduplicated_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    async with SqliteStore(path) as store:
        ar = await store.start_rollout("x")
        rid, aid = ar.rollout.rollout_id, ar.attempt.attempt_id
        batch = [_span(rid, aid, "a"), _span(rid, aid, "b")]
        first = await store.add_spans(batch)
    async with SqliteStore(path) as store:  # the server restarted between the send and the retry
        assert await store.add_spans(batch) == first
        assert [s.sequence_id for s in await store.query_spans(rid)] == [1, 2]


async def test_sqlite_old_file_with_repeated_spans_still_opens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "store.db"
    async with SqliteStore(path) as store:
        ar = await store.start_rollout("x")
        rid, aid = ar.rollout.rollout_id, ar.attempt.attempt_id
        first = await store.add_span(_span(rid, aid))
    with closing(sqlite3.connect(path)) as conn, conn:  # what a version without the span key index could leave
        conn.execute("DROP INDEX spans_by_key")
        conn.execute(
            "INSERT INTO spans (rollout_id, attempt_id, attempt_seq, sequence_id, name, trace_id, span_id, start_time, "
            "attributes, events, status, resource) SELECT rollout_id, attempt_id, attempt_seq, 2, 'dup', trace_id, "
            "span_id, start_time, attributes, events, status, resource FROM spans"
        )
    with caplog.at_level(logging.WARNING, logger="agentkiln.store.sqlite_schema"):
        async with SqliteStore(path) as store:
            assert await store.add_span(_resend(first)) == first  # the first stored copy wins
            assert (await store.add_span(_span(rid, aid))).sequence_id == 3
            assert len(await store.query_spans(rid)) == 3
    assert "without a unique index" in caplog.text


# --------------------------------------------------------------------------- production (learning from use)


def _call_span(rid: str, aid: str, call_id: str, *, choice: int = 0, version: str | None = "v1") -> SpanIn:
    """A gateway LLM-call span: what the response-id index is built from."""
    attrs: dict = {SpanAttrs.call_id: call_id, SpanAttrs.choice_index: choice}
    if version is not None:
        attrs[SpanAttrs.model_version] = version
    return SpanIn(rollout_id=rid, attempt_id=aid, name=SpanNames.llm_call, attributes=attrs)


async def test_open_session_is_idempotent_under_concurrent_first_calls(store: Store) -> None:
    opened = await asyncio.gather(*(store.open_session("chat-42", metadata={"user": "u1"}) for _ in range(10)))
    rid = session_rollout_id("chat-42")
    assert {o.rollout.rollout_id for o in opened} == {rid}
    assert {o.attempt.attempt_id for o in opened} == {SESSION_ATTEMPT_ID}
    first = opened[0].rollout
    assert first.mode == RolloutMode.production and first.status == S.running
    assert first.input == {"session_id": "chat-42"} and first.metadata == {"user": "u1"}
    assert first.config.timeout_s is None and first.config.unresponsive_s is None
    assert [r.rollout_id for r in await store.query_rollouts(mode=RolloutMode.production)] == [rid]
    assert len(await store.query_attempts(rid)) == 1
    assert (await store.open_session("chat-42")).rollout == await store.get_rollout(rid)  # later calls: same one


async def test_sessions_take_spans_and_no_sweep_ends_them(store: Store) -> None:
    a = await store.open_session("s-a")
    b = await store.open_session("s-b")  # every session's attempt is "live": ids are per rollout
    ra, rb = a.rollout.rollout_id, b.rollout.rollout_id
    await store.add_spans([_call_span(ra, SESSION_ATTEMPT_ID, "c1"), _call_span(rb, SESSION_ATTEMPT_ID, "c2")])
    await store.add_span(_call_span(ra, SESSION_ATTEMPT_ID, "c3"))
    assert [s.sequence_id for s in await store.query_spans(ra)] == [1, 2]
    assert [s.attributes[SpanAttrs.call_id] for s in await store.query_spans(rb, attempt_id=SESSION_ATTEMPT_ID)] == ["c2"]
    assert await store.check_timeouts(now=wall_now() + 10**7) == []
    assert await store.attempt_statuses(ra) == {SESSION_ATTEMPT_ID: AttemptStatus.running}
    assert (await store.get_rollout(rb)).status == S.running


async def test_feedback_resolves_response_session_and_span(store: Store) -> None:
    s = await store.open_session("s-1")
    rid = s.rollout.rollout_id
    c1 = await store.add_span(_call_span(rid, SESSION_ATTEMPT_ID, "chatcmpl-1", choice=1, version="v7"))
    c0 = await store.add_span(_call_span(rid, SESSION_ATTEMPT_ID, "chatcmpl-1", choice=0, version="v7"))
    by_response = await store.add_feedback(FeedbackIn(response_id="chatcmpl-1", name="thumbs", value=True))
    assert (by_response.rollout_id, by_response.attempt_id) == (rid, SESSION_ATTEMPT_ID)
    assert by_response.resolved_span_id == c0.span_id  # choice 0 first, whatever arrived first
    assert by_response.model_version == "v7" and by_response.value is True and by_response.feedback_id
    by_session = await store.add_feedback(FeedbackIn(session_id="s-1", value=0.5, comment="ok"))
    assert by_session.rollout_id == rid and by_session.resolved_span_id is None and by_session.model_version == "v7"
    by_span = await store.add_feedback(
        FeedbackIn(span_id=c1.span_id, rollout_id=rid, value="wrong", correction="the answer is 4")
    )
    assert (by_span.resolved_span_id, by_span.attempt_id, by_span.correction) == (c1.span_id, SESSION_ATTEMPT_ID,
                                                                                 "the answer is 4")  # fmt: skip
    # a training rollout's calls take feedback too
    ar = await store.start_rollout("x")
    t = await store.add_span(_call_span(ar.rollout.rollout_id, ar.attempt.attempt_id, "chatcmpl-t", version=None))
    on_train = await store.add_feedback(FeedbackIn(response_id="chatcmpl-t", value=1))
    assert (on_train.rollout_id, on_train.attempt_id, on_train.resolved_span_id, on_train.model_version) == (
        ar.rollout.rollout_id, ar.attempt.attempt_id, t.span_id, None)  # fmt: skip


async def test_feedback_on_unknown_targets_is_not_found(store: Store) -> None:
    s = await store.open_session("s-known")
    await store.add_span(_call_span(s.rollout.rollout_id, SESSION_ATTEMPT_ID, "known-call"))
    for bad in (
        FeedbackIn(response_id="no-such-call", value=1),
        FeedbackIn(response_id="known-call", rollout_id="ro-other", value=1),
        FeedbackIn(session_id="no-such-session", value=1),
        FeedbackIn(span_id="no-such-span", rollout_id=s.rollout.rollout_id, value=1),
        FeedbackIn(span_id="x", rollout_id="ro-nope", value=1),
    ):
        with pytest.raises(NotFoundError):
            await store.add_feedback(bad)
    assert await store.query_feedback() == []


async def test_feedback_client_id_makes_a_retry_idempotent(store: Store) -> None:
    await store.open_session("s-idem")
    first = await store.add_feedback(FeedbackIn(session_id="s-idem", value=1, client_id="post-1"))
    again = await store.add_feedback(FeedbackIn(session_id="s-idem", value=0, client_id="post-1"))
    assert again == first
    other = await store.add_feedback(FeedbackIn(session_id="s-idem", value=0, client_id="post-2"))
    assert other.feedback_id != first.feedback_id
    assert [f.feedback_id for f in await store.query_feedback(session_id="s-idem")] == [first.feedback_id,
                                                                                        other.feedback_id]  # fmt: skip


async def test_query_feedback_by_session_response_and_time(store: Store) -> None:
    s = await store.open_session("s-q")
    rid = s.rollout.rollout_id
    await store.add_span(_call_span(rid, SESSION_ATTEMPT_ID, "q-1"))
    await store.add_span(_call_span(rid, SESSION_ATTEMPT_ID, "q-2"))
    await store.open_session("s-other")
    on_call = await store.add_feedback(FeedbackIn(response_id="q-1", value=1))
    on_session = await store.add_feedback(FeedbackIn(session_id="s-q", value=0))
    await store.add_feedback(FeedbackIn(session_id="s-other", value=1))
    on_call2 = await store.add_feedback(FeedbackIn(response_id="q-2", name="rating", value=4, metadata={"ui": "web"}))
    ids = lambda fbs: [f.feedback_id for f in fbs]
    assert ids(await store.query_feedback(session_id="s-q")) == ids([on_call, on_session, on_call2])  # oldest first
    assert ids(await store.query_feedback(rollout_id=rid)) == ids([on_call, on_session, on_call2])
    assert ids(await store.query_feedback(response_id="q-2")) == [on_call2.feedback_id]
    assert (await store.query_feedback(response_id="q-2"))[0] == on_call2 and on_call2.metadata == {"ui": "web"}
    assert ids(await store.query_feedback(session_id="s-q", limit=1, offset=1)) == [on_session.feedback_id]
    assert ids(await store.query_feedback(session_id="s-q", since=on_session.created_at)) == ids([on_session, on_call2])
    assert await store.query_feedback(session_id="s-q", rollout_id="ro-other") == []
    assert await store.query_feedback(session_id="never-seen") == []
    assert len(await store.query_feedback()) == 4


async def test_latest_resources_skips_candidates(store: Store) -> None:
    deployed = await store.add_resources(ResourcesIn(llms={"main": LLMEndpoint(model="m1")}))
    candidate = await store.add_resources(ResourcesIn(llms={"main": LLMEndpoint(model="m2")}, candidate=True))
    assert candidate.candidate and candidate.version == 2
    assert await store.get_latest_resources() == deployed
    assert (await store.get_resources(candidate.resources_id)).candidate is True
    assert [r.candidate for r in await store.query_resources()] == [False, True]
    promoted = await store.add_resources(ResourcesIn(llms={"main": LLMEndpoint(model="m2")}))
    assert await store.get_latest_resources() == promoted


async def test_canary_start_decide_and_conflicts(store: Store) -> None:
    assert await store.get_active_canary() is None
    base = await store.add_resources(ResourcesIn(llms={"main": LLMEndpoint(model="m1")}))
    cand = await store.add_resources(ResourcesIn(llms={"main": LLMEndpoint(model="m2")}, candidate=True))
    canary = await store.start_canary(CanaryIn(candidate_resources_id=cand.resources_id, share=0.3))
    assert canary.baseline_resources_id == base.resources_id  # default: the latest deployed version
    assert canary.status == CanaryStatus.active and [d.action for d in canary.decisions] == ["start"]
    assert canary.share == 0.3 and canary.rule.metric == "user"
    assert await store.get_canary(canary.canary_id) == canary
    assert await store.get_active_canary() == canary
    with pytest.raises(InvalidTransitionError):  # one active canary at a time
        await store.start_canary(CanaryIn(candidate_resources_id=cand.resources_id))
    decision = CanaryDecision(action="promote", by="rule", reason="not worse", stats={"n": 40})
    promoted = await store.decide_canary(canary.canary_id, decision, promoted_resources_id="res-published")
    assert promoted.status == CanaryStatus.promoted and promoted.ended_at is not None
    assert promoted.promoted_resources_id == "res-published"
    assert [d.action for d in promoted.decisions] == ["start", "promote"] and promoted.decisions[1].stats == {"n": 40}
    with pytest.raises(InvalidTransitionError):  # a second decider (another replica) loses
        await store.decide_canary(canary.canary_id, CanaryDecision(action="rollback"))
    assert await store.get_active_canary() is None
    second = await store.start_canary(
        CanaryIn(candidate_resources_id=cand.resources_id, baseline_resources_id=base.resources_id)
    )
    rolled = await store.decide_canary(second.canary_id, CanaryDecision(action="rollback", by="user"))
    assert rolled.status == CanaryStatus.rolled_back and rolled.promoted_resources_id is None
    assert [c.canary_id for c in await store.query_canaries()] == [second.canary_id, canary.canary_id]  # newest first
    assert [c.canary_id for c in await store.query_canaries(limit=1, offset=1)] == [canary.canary_id]
    assert await store.get_canary(canary.canary_id) == promoted


async def test_canary_refuses_unknown_resources(store: Store) -> None:
    with pytest.raises(NotFoundError):
        await store.start_canary(CanaryIn(candidate_resources_id="res-nope"))
    cand = await store.add_resources(ResourcesIn(candidate=True))
    with pytest.raises(NotFoundError):  # no deployed version to default the baseline to
        await store.start_canary(CanaryIn(candidate_resources_id=cand.resources_id))
    with pytest.raises(NotFoundError):
        await store.start_canary(CanaryIn(candidate_resources_id=cand.resources_id, baseline_resources_id="res-nope"))
    with pytest.raises(ValidationError):
        await store.start_canary(
            CanaryIn(candidate_resources_id=cand.resources_id, baseline_resources_id=cand.resources_id)
        )
    with pytest.raises(NotFoundError):
        await store.get_canary("can-nope")
    with pytest.raises(NotFoundError):
        await store.decide_canary("can-nope", CanaryDecision(action="rollback"))
    assert await store.query_canaries() == []


async def test_purge_production_deletes_idle_sessions_only(store: Store) -> None:
    old = await store.open_session("old")
    kept = await store.open_session("kept")
    rid_old, rid_kept = old.rollout.rollout_id, kept.rollout.rollout_id
    await store.add_span(_call_span(rid_old, SESSION_ATTEMPT_ID, "old-call"))
    await store.add_feedback(FeedbackIn(response_id="old-call", value=1))
    await store.add_feedback(FeedbackIn(session_id="old", value=1))
    train = await store.start_rollout("t", mode=RolloutMode.train)
    await store.add_span(_call_span(train.rollout.rollout_id, train.attempt.attempt_id, "train-call"))
    await store.add_feedback(FeedbackIn(response_id="train-call", value=1))
    now = wall_now()
    late = _call_span(rid_kept, SESSION_ATTEMPT_ID, "kept-call").model_copy(update={"start_time": now + 3600})
    await store.add_span(late)  # its latest span is later than the cut-off
    assert await store.purge_production(before=now - 3600) == 0  # nothing idle that long
    assert await store.purge_production(before=now + 60) == 1
    with pytest.raises(NotFoundError):
        await store.get_rollout(rid_old)
    with pytest.raises(NotFoundError):
        await store.query_spans(rid_old)
    with pytest.raises(NotFoundError):  # its calls left the response-id index
        await store.add_feedback(FeedbackIn(response_id="old-call", value=1))
    assert await store.query_feedback(session_id="old") == []
    assert len(await store.query_feedback(rollout_id=train.rollout.rollout_id)) == 1  # training data stays
    assert (await store.get_rollout(rid_kept)).status == S.running
    reopened = await store.open_session("old")  # a session seen again starts afresh
    assert reopened.rollout.rollout_id == rid_old and await store.query_spans(rid_old) == []


async def test_sqlite_version_1_file_upgrades_for_sessions(tmp_path: Path) -> None:
    """A file written before learning from use: attempts keyed by attempt id alone, no candidate column."""
    path = tmp_path / "store.db"
    async with SqliteStore(path) as store:
        ar = await store.start_rollout("x")
        rid, aid = ar.rollout.rollout_id, ar.attempt.attempt_id
        await store.add_span(_call_span(rid, aid, "old-call", version="v3"))
        deployed = await store.add_resources(ResourcesIn())
    a_cols = "attempt_id, rollout_id, sequence_id, worker_id, status, start_time, end_time, last_heartbeat, error"
    with closing(sqlite3.connect(path)) as conn, conn:  # what version 1 left behind
        conn.execute("ALTER TABLE attempts RENAME TO a2")
        conn.execute(
            "CREATE TABLE attempts (attempt_id TEXT PRIMARY KEY, rollout_id TEXT NOT NULL, sequence_id INTEGER NOT NULL, "
            "worker_id TEXT, status TEXT NOT NULL, start_time REAL NOT NULL, end_time REAL, last_heartbeat REAL "
            "NOT NULL, error TEXT, UNIQUE (rollout_id, sequence_id))"
        )
        conn.execute(f"INSERT INTO attempts ({a_cols}) SELECT {a_cols} FROM a2")
        conn.execute("DROP TABLE a2")
        conn.execute("ALTER TABLE resources DROP COLUMN candidate")
        conn.execute("DROP TABLE llm_calls")
        conn.execute("PRAGMA user_version = 1")
    async with SqliteStore(path) as store:
        assert await store.get_latest_resources() == deployed
        assert (await store.get_latest_attempt(rid)).attempt_id == aid
        fb = await store.add_feedback(FeedbackIn(response_id="old-call", value=1))  # the index was backfilled
        assert (fb.rollout_id, fb.attempt_id, fb.model_version) == (rid, aid, "v3")
        for sid in ("one", "two"):  # two sessions, both with attempt "live"
            await store.open_session(sid)
            await store.add_span(_call_span(session_rollout_id(sid), SESSION_ATTEMPT_ID, f"{sid}-call"))
        assert len(await store.query_spans(session_rollout_id("two"))) == 1
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2


# --------------------------------------------------------------------------- Responses API state


def _stored(rid: str, created_at: float, size: int = 100, **fields: object) -> StoredResponse:
    return StoredResponse(response_id=rid, response={"id": rid, "output": []}, created_at=created_at, size=size,
                          **fields)  # type: ignore[arg-type]  # fmt: skip


async def test_stored_responses_round_trip_and_delete(store: Store) -> None:
    rec = StoredResponse(
        response_id="resp_1",
        response={"id": "resp_1", "object": "response", "output": [{"type": "message", "content": [{"text": "é"}]}]},
        input_items=[{"id": "msg_1", "type": "message", "role": "user", "content": "hi"}],
        conversation=[{"type": "message", "role": "user", "content": "hi"}, {"type": "function_call", "name": "f"}],
        rollout_id="ro-1",
        attempt_id="at-1",
        created_at=1_700_000_000.25,
        size=321,
    )
    await store.put_response(rec)
    assert await store.get_response("resp_1") == rec
    again = rec.model_copy(update={"size": 322})
    await store.put_response(again)  # a retried put replaces, never duplicates
    assert await store.get_response("resp_1") == again
    await store.delete_response("resp_1")
    with pytest.raises(NotFoundError):
        await store.get_response("resp_1")
    with pytest.raises(NotFoundError):
        await store.delete_response("resp_1")
    with pytest.raises(NotFoundError):
        await store.get_response("resp_never")


async def test_purge_responses_applies_age_then_bytes_oldest_first(store: Store) -> None:
    for i in range(6):  # created 0..5 s after t0, 100 bytes each
        await store.put_response(_stored(f"r{i}", 1_000.0 + i))
    assert await store.purge_responses(before=0.0, max_bytes=10_000) == 0  # within both bounds
    assert await store.purge_responses(before=1_001.5, max_bytes=10_000) == 2  # r0, r1: too old
    # 400 bytes left (r2..r5); 250 allowed: the oldest go until the rest fit.
    assert await store.purge_responses(before=0.0, max_bytes=250) == 2
    for gone in ("r0", "r1", "r2", "r3"):
        with pytest.raises(NotFoundError):
            await store.get_response(gone)
    assert [(await store.get_response(k)).response_id for k in ("r4", "r5")] == ["r4", "r5"]
    with pytest.raises(ValidationError):
        await store.purge_responses(before=0.0, max_bytes=10, limit=0)


async def test_purge_responses_is_bounded_per_call(store: Store) -> None:
    for i in range(5):
        await store.put_response(_stored(f"old{i}", 10.0 + i))
    assert await store.purge_responses(before=100.0, max_bytes=10_000, limit=2) == 2
    with pytest.raises(NotFoundError):  # the oldest first
        await store.get_response("old1")
    assert (await store.get_response("old2")).response_id == "old2"
    assert await store.purge_responses(before=100.0, max_bytes=10_000, limit=2) == 2
    assert await store.purge_responses(before=100.0, max_bytes=10_000, limit=2) == 1
    assert await store.purge_responses(before=100.0, max_bytes=10_000, limit=2) == 0


async def test_sqlite_stored_responses_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    async with SqliteStore(path) as store:
        await store.put_response(_stored("resp_kept", 5.0, rollout_id="ro", attempt_id="at"))
    async with SqliteStore(path) as store:
        got = await store.get_response("resp_kept")
        assert (got.rollout_id, got.attempt_id, got.size) == ("ro", "at", 100)
