"""Lifecycle rules (retries, timeouts, heartbeats, FIFO, concurrency) on every backend, plus SQLite specifics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agentkiln.models import (
    AttemptError,
    AttemptStatus,
    FailureKind,
    ResourcesIn,
    Rollout,
    RolloutConfig,
    RolloutStatus,
    SpanIn,
    WorkerStatus,
)
from agentkiln.store import InvalidTransitionError, SqliteStore, Store, StoreError, lifecycle, open_store

S = RolloutStatus
A = AttemptStatus


def _err(kind: FailureKind) -> AttemptError:
    return AttemptError(kind=kind, message=kind.value)


def _span(rid: str, aid: str, name: str = "s") -> SpanIn:
    return SpanIn(rollout_id=rid, attempt_id=aid, name=name)


async def _dequeue(store: Store, worker_id: str = "w"):
    ar = await store.dequeue_rollout(worker_id=worker_id)
    assert ar is not None
    return ar


# --------------------------------------------------------------------------- retries


async def test_retry_until_max_attempts_then_failed(store: Store) -> None:
    cfg = RolloutConfig(max_attempts=3, retry_on=[FailureKind.llm_error])
    r = await store.enqueue_rollout("x", config=cfg)
    for n in (1, 2, 3):
        ar = await _dequeue(store)
        assert ar.rollout.rollout_id == r.rollout_id and ar.attempt.sequence_id == n
        await store.update_attempt(
            r.rollout_id, ar.attempt.attempt_id, status=A.failed, error=_err(FailureKind.llm_error)
        )
        expected = S.requeuing if n < 3 else S.failed
        got = await store.get_rollout(r.rollout_id)
        assert got.status == expected and got.num_attempts == n
        assert (got.end_time is not None) == (expected == S.failed)
    assert await store.dequeue_rollout() is None
    attempts = await store.query_attempts(r.rollout_id)
    assert [(a.sequence_id, a.status) for a in attempts] == [(1, A.failed), (2, A.failed), (3, A.failed)]


async def test_success_after_retry(store: Store) -> None:
    cfg = RolloutConfig(max_attempts=2, retry_on=[FailureKind.tool_error])
    r = await store.enqueue_rollout("x", config=cfg)
    a1 = await _dequeue(store)
    await store.update_attempt(r.rollout_id, a1.attempt.attempt_id, status=A.failed, error=_err(FailureKind.tool_error))
    a2 = await _dequeue(store)
    await store.update_attempt(r.rollout_id, a2.attempt.attempt_id, status=A.succeeded)
    got = await store.get_rollout(r.rollout_id)
    assert got.status == S.succeeded and got.start_time == a1.rollout.start_time


@pytest.mark.parametrize("error", [_err(FailureKind.agent_exception), None])
async def test_only_listed_kinds_retry(store: Store, error: AttemptError | None) -> None:
    cfg = RolloutConfig(max_attempts=5, retry_on=[FailureKind.llm_error])
    r = await store.enqueue_rollout("x", config=cfg)
    ar = await _dequeue(store)
    await store.update_attempt(r.rollout_id, ar.attempt.attempt_id, status=A.failed, error=error)
    assert (await store.get_rollout(r.rollout_id)).status == S.failed
    assert await store.dequeue_rollout() is None


async def test_fifo_keeps_requeued_rollout_in_creation_order(store: Store) -> None:
    cfg = RolloutConfig(max_attempts=2, retry_on=[FailureKind.llm_error])
    a, b, c = [await store.enqueue_rollout(i, config=cfg) for i in range(3)]
    first = await _dequeue(store)
    assert first.rollout.rollout_id == a.rollout_id
    await store.update_attempt(
        a.rollout_id, first.attempt.attempt_id, status=A.failed, error=_err(FailureKind.llm_error)
    )
    order = [(await _dequeue(store)).rollout.rollout_id for _ in range(3)]
    assert order == [a.rollout_id, b.rollout_id, c.rollout_id]


async def test_manual_requeue_of_running_rollout(store: Store) -> None:
    r = await store.enqueue_rollout("x")
    ar = await _dequeue(store)
    assert (await store.update_rollout(r.rollout_id, status=S.queuing)).status == S.queuing
    assert (await store.get_latest_attempt(r.rollout_id)).status == A.cancelled
    again = await _dequeue(store)
    assert again.rollout.rollout_id == r.rollout_id and again.attempt.sequence_id == 2
    with pytest.raises(InvalidTransitionError):
        await store.update_attempt(r.rollout_id, ar.attempt.attempt_id, status=A.succeeded)


# --------------------------------------------------------------------------- timeouts


async def test_timeout_detection_and_retry(store: Store) -> None:
    cfg = RolloutConfig(timeout_s=10, max_attempts=2, retry_on=[FailureKind.timeout])
    r = await store.enqueue_rollout("x", config=cfg)
    ar = await _dequeue(store)
    t0 = ar.attempt.start_time
    assert await store.check_timeouts(now=t0 + 5) == []
    [changed] = await store.check_timeouts(now=t0 + 11)
    assert changed.attempt_id == ar.attempt.attempt_id
    assert changed.status == A.timeout and changed.error.kind == FailureKind.timeout and changed.end_time is not None
    assert (await store.get_rollout(r.rollout_id)).status == S.requeuing
    with pytest.raises(InvalidTransitionError):  # the runner's late report is refused
        await store.update_attempt(r.rollout_id, ar.attempt.attempt_id, status=A.succeeded)
    ar2 = await _dequeue(store)
    assert ar2.attempt.sequence_id == 2
    assert [a.status for a in await store.check_timeouts(now=ar2.attempt.start_time + 11)] == [A.timeout]
    assert (await store.get_rollout(r.rollout_id)).status == S.failed
    assert await store.check_timeouts(now=ar2.attempt.start_time + 100) == []


async def test_timeout_not_retried_when_not_listed(store: Store) -> None:
    r = await store.enqueue_rollout("x", config=RolloutConfig(timeout_s=1, max_attempts=3))
    ar = await _dequeue(store)
    await store.check_timeouts(now=ar.attempt.start_time + 2)
    assert (await store.get_rollout(r.rollout_id)).status == S.failed


async def test_unresponsive_detection(store: Store) -> None:
    cfg = RolloutConfig(unresponsive_s=5)
    r = await store.enqueue_rollout("x", config=cfg)
    ar = await _dequeue(store)
    hb = await store.heartbeat_attempt(r.rollout_id, ar.attempt.attempt_id)
    assert await store.check_timeouts(now=hb.last_heartbeat + 3) == []
    [changed] = await store.check_timeouts(now=hb.last_heartbeat + 6)
    assert changed.status == A.unresponsive and changed.error.kind == FailureKind.unresponsive
    assert (await store.get_rollout(r.rollout_id)).status == S.failed  # unresponsive not in retry_on
    # the rollout is finished, so a late heartbeat does not revive the attempt
    late = await store.heartbeat_attempt(r.rollout_id, ar.attempt.attempt_id)
    assert late.status == A.unresponsive
    assert (await store.get_rollout(r.rollout_id)).status == S.failed


async def test_timeout_wakes_waiters(store: Store) -> None:
    r = await store.enqueue_rollout("x", config=RolloutConfig(timeout_s=1))
    ar = await _dequeue(store)
    waiter = asyncio.create_task(store.wait_for_rollouts([r.rollout_id], timeout=10))
    await asyncio.sleep(0.01)
    await store.check_timeouts(now=ar.attempt.start_time + 5)
    [done] = await waiter
    assert done.status == S.failed


# --------------------------------------------------------------------------- heartbeat revival

_RETRY_UNRESPONSIVE = RolloutConfig(unresponsive_s=5, max_attempts=2, retry_on=[FailureKind.unresponsive])


async def _make_unresponsive(store: Store) -> tuple[Rollout, str]:
    r = await store.enqueue_rollout("x", config=_RETRY_UNRESPONSIVE)
    ar = await _dequeue(store)
    [changed] = await store.check_timeouts(now=ar.attempt.last_heartbeat + 60)
    assert changed.status == A.unresponsive
    assert (await store.get_rollout(r.rollout_id)).status == S.requeuing
    return r, ar.attempt.attempt_id


@pytest.mark.parametrize("via", ["heartbeat", "span", "update_running"])
async def test_activity_revives_unresponsive_attempt(store: Store, via: str) -> None:
    r, aid = await _make_unresponsive(store)
    if via == "heartbeat":
        await store.heartbeat_attempt(r.rollout_id, aid)
    elif via == "span":
        await store.add_span(_span(r.rollout_id, aid))
    else:
        await store.update_attempt(r.rollout_id, aid, status=A.running)
    attempt = await store.get_latest_attempt(r.rollout_id)
    assert attempt.attempt_id == aid and attempt.status == A.running and attempt.error is None
    assert (await store.get_rollout(r.rollout_id)).status == S.running
    assert await store.dequeue_rollout() is None  # no longer waiting
    await store.update_attempt(r.rollout_id, aid, status=A.succeeded)
    assert (await store.get_rollout(r.rollout_id)).status == S.succeeded


async def test_unresponsive_attempt_can_still_finish_its_rollout(store: Store) -> None:
    r, aid = await _make_unresponsive(store)
    await store.update_attempt(r.rollout_id, aid, status=A.succeeded)
    assert (await store.get_rollout(r.rollout_id)).status == S.succeeded


async def test_stale_attempt_not_revived_after_redequeue(store: Store) -> None:
    r, stale = await _make_unresponsive(store)
    fresh = await _dequeue(store, worker_id="w2")
    assert fresh.attempt.sequence_id == 2
    span = await store.add_span(_span(r.rollout_id, stale, "late"))
    hb = await store.heartbeat_attempt(r.rollout_id, stale)
    assert hb.status == A.unresponsive
    assert [s.sequence_id for s in await store.query_spans(r.rollout_id, attempt_id=stale)] == [span.sequence_id]
    # a non-latest attempt finishing never moves the rollout
    await store.update_attempt(r.rollout_id, stale, status=A.succeeded)
    got = await store.get_rollout(r.rollout_id)
    assert got.status == S.running
    assert (await store.get_latest_attempt(r.rollout_id)).attempt_id == fresh.attempt.attempt_id
    await store.update_attempt(r.rollout_id, fresh.attempt.attempt_id, status=A.failed, error=_err(FailureKind.loop))
    assert (await store.get_rollout(r.rollout_id)).status == S.failed


async def test_cancel_requeuing_rollout_cancels_unresponsive_attempt(store: Store) -> None:
    r, _ = await _make_unresponsive(store)
    await store.cancel_rollout(r.rollout_id)
    a = await store.get_latest_attempt(r.rollout_id)
    assert a.status == A.cancelled
    assert await store.dequeue_rollout() is None


# --------------------------------------------------------------------------- concurrency


async def test_concurrent_dequeue_never_duplicates(store: Store) -> None:
    ids = [r.rollout_id for r in await store.enqueue_rollouts([{"input": i} for i in range(40)])]

    async def drain(worker: str) -> list[str]:
        got = []
        while (ar := await store.dequeue_rollout(worker_id=worker)) is not None:
            got.append(ar.rollout.rollout_id)
        return got

    results = await asyncio.gather(*(drain(f"w{i}") for i in range(8)))
    flat = [rid for got in results for rid in got]
    assert sorted(flat) == sorted(ids) and len(flat) == len(set(flat))
    for got in results:  # each worker sees FIFO order
        assert got == sorted(got, key=ids.index)


async def test_concurrent_span_adds_get_contiguous_sequence_ids(store: Store) -> None:
    ar = await store.start_rollout("x")
    rid, aid = ar.rollout.rollout_id, ar.attempt.attempt_id
    out = await asyncio.gather(*(store.add_span(_span(rid, aid, f"s{i}")) for i in range(50)))
    assert sorted(s.sequence_id for s in out) == list(range(1, 51))
    stored = await store.query_spans(rid)
    assert [s.sequence_id for s in stored] == list(range(1, 51))
    assert {s.name: s.sequence_id for s in stored} == {s.name: s.sequence_id for s in out}


# --------------------------------------------------------------------------- pure rules


def test_transition_table_messages() -> None:
    with pytest.raises(InvalidTransitionError, match="succeeded is final"):
        lifecycle.check_rollout_transition("ro-1", S.succeeded, S.queuing)
    with pytest.raises(InvalidTransitionError, match="dequeue_rollout"):
        lifecycle.check_rollout_transition("ro-1", S.queuing, S.running)
    lifecycle.check_rollout_transition("ro-1", S.cancelled, S.cancelled)  # idempotent
    lifecycle.check_rollout_transition("ro-1", S.running, S.requeuing)


# --------------------------------------------------------------------------- SQLite specifics


async def test_sqlite_two_stores_on_one_file_never_double_dequeue(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    s1, s2 = SqliteStore(path), SqliteStore(path)
    try:
        ids = [r.rollout_id for r in await s1.enqueue_rollouts([{"input": i} for i in range(60)])]

        async def drain(store: Store) -> list[str]:
            got = []
            while (ar := await store.dequeue_rollout()) is not None:
                got.append(ar.rollout.rollout_id)
            return got

        alternating = [(await s.dequeue_rollout()).rollout.rollout_id for s in (s1, s2, s1, s2)]
        assert alternating == ids[:4]  # one FIFO shared through the file
        results = await asyncio.gather(*(drain(s) for s in (s1, s2, s1, s2, s1, s2)))
        flat = alternating + [rid for got in results for rid in got]
        assert sorted(flat) == sorted(ids) and len(flat) == len(set(flat))
        # a rollout finished through one store wakes a waiter on the other (by polling the file)
        r = await s1.enqueue_rollout("last")
        ar = await s2.dequeue_rollout()
        waiter = asyncio.create_task(s1.wait_for_rollouts([r.rollout_id], timeout=10))
        await asyncio.sleep(0.01)
        await s2.update_attempt(r.rollout_id, ar.attempt.attempt_id, status=A.succeeded)
        assert [x.status for x in await waiter] == [S.succeeded]
    finally:
        await s1.close()
        await s2.close()


async def test_sqlite_data_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "persist.db"
    store = open_store(f"sqlite:///{path}")
    assert isinstance(store, SqliteStore)
    cfg = RolloutConfig(max_attempts=2, retry_on=[FailureKind.llm_error], timeout_s=30)
    r1 = await store.enqueue_rollout({"q": 1}, config=cfg, metadata={"m": 1})
    r2 = await store.enqueue_rollout({"q": 2})
    ar = await store.dequeue_rollout()
    await store.add_spans([_span(r1.rollout_id, ar.attempt.attempt_id) for _ in range(3)])
    res = await store.add_resources(ResourcesIn(metadata={"v": 1}))
    await store.heartbeat_worker("w1", status=WorkerStatus.busy)
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.get_rollout(r1.rollout_id)

    reopened = open_store(str(path))
    try:
        assert (await reopened.get_rollout(r1.rollout_id)).model_dump() == {
            **r1.model_dump(), "status": S.running, "num_attempts": 1, "start_time": ar.rollout.start_time,
        }  # fmt: skip
        latest = await reopened.get_latest_attempt(r1.rollout_id)
        assert latest.model_dump(exclude={"last_heartbeat"}) == ar.attempt.model_dump(exclude={"last_heartbeat"})
        assert len(await reopened.query_spans(r1.rollout_id)) == 3
        assert (await reopened.add_span(_span(r1.rollout_id, ar.attempt.attempt_id))).sequence_id == 4
        assert await reopened.get_latest_resources() == res
        assert (await reopened.add_resources(ResourcesIn())).version == 2
        assert [w.worker_id for w in await reopened.query_workers()] == ["w1"]
        nxt = await reopened.dequeue_rollout()
        assert nxt is not None and nxt.rollout.rollout_id == r2.rollout_id
    finally:
        await reopened.close()
