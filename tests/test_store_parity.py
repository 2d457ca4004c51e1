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
    FailureKind,
    LLMEndpoint,
    PromptTemplate,
    ResourcesIn,
    RolloutConfig,
    RolloutMode,
    RolloutStatus,
    Span,
    SpanIn,
    WorkerStatus,
)
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
