"""SqliteStore writes a lone span on the caller's thread when the file is free, else joins the group commit."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from agentkiln.models import SpanIn
from agentkiln.store import NotFoundError, SqliteStore
from agentkiln.store import sqlite_connections as sqlite_mod
from agentkiln.store.sqlite_worker import DbThread


def _span(rid: str, aid: str, i: int) -> SpanIn:
    return SpanIn(rollout_id=rid, attempt_id=aid, name="llm_call", start_time=0.0, end_time=1.0, attributes={"i": i})


def _stored_elsewhere(path: Path, rid: str) -> list[int]:
    """What another connection (another process, or the store after a crash) reads from the file."""
    with sqlite3.connect(path) as conn:
        return [row[0] for row in conn.execute("SELECT sequence_id FROM spans WHERE rollout_id = ? ORDER BY 1", (rid,))]


async def test_lone_span_is_committed_without_the_database_thread(tmp_path: Path, monkeypatch) -> None:
    store = SqliteStore(tmp_path / "s.db")
    ar = await store.start_rollout("x")
    rid, aid = ar.rollout.rollout_id, ar.attempt.attempt_id

    async def no_round_trip(fn, *, write=True):
        raise AssertionError("went through the database thread")

    monkeypatch.setattr(store, "_call", no_round_trip)
    spans = await store.add_spans([_span(rid, aid, 1)])
    assert [s.sequence_id for s in spans] == [1]
    assert _stored_elsewhere(tmp_path / "s.db", rid) == [1]  # committed before add_spans returned
    assert (await store.add_spans([_span(rid, aid, 2)]))[0].sequence_id == 2
    monkeypatch.undo()
    await store.close()


async def test_locked_file_falls_back_to_the_group_commit(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SqliteStore(path)
    ar = await store.start_rollout("x")
    rid, aid = ar.rollout.rollout_id, ar.attempt.attempt_id
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer (process) holds the lock
    task = asyncio.create_task(store.add_spans([_span(rid, aid, 1)]))
    await asyncio.sleep(0.2)
    assert not task.done()  # waiting in the database thread's queue, the event loop is free
    other.execute("COMMIT")
    other.close()
    spans = await asyncio.wait_for(task, 10)
    assert [s.sequence_id for s in spans] == [1] and _stored_elsewhere(path, rid) == [1]
    await store.close()


async def test_direct_commits_are_checkpointed_by_the_database_thread(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sqlite_mod, "CHECKPOINT_EVERY", 4)
    checkpoints: list[int] = []
    real = DbThread._checkpoint
    monkeypatch.setattr(DbThread, "_checkpoint", staticmethod(lambda conn: (checkpoints.append(1), real(conn))))
    store = SqliteStore(tmp_path / "s.db")
    ar = await store.start_rollout("x")
    for i in range(9):
        await store.add_spans([_span(ar.rollout.rollout_id, ar.attempt.attempt_id, i)])
    await store.close()  # the queue is drained before the thread stops
    assert len(checkpoints) == 2
    assert _stored_elsewhere(tmp_path / "s.db", ar.rollout.rollout_id) == list(range(1, 10))


async def test_failed_direct_write_stores_nothing(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    ar = await store.start_rollout("x")
    with pytest.raises(NotFoundError):
        await store.add_spans([_span(ar.rollout.rollout_id, "at-nope", 1)])
    assert await store.add_spans([_span(ar.rollout.rollout_id, ar.attempt.attempt_id, 1)])
    assert _stored_elsewhere(tmp_path / "s.db", ar.rollout.rollout_id) == [1]
    await store.close()
