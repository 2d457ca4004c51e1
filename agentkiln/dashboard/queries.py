"""The dashboard's reads of the store: a filtered rollouts page and the store-wide counts.

`Store.query_rollouts` filters by status and mode only, so the dashboard answers its other
filters (failure kind, agent, resources version, text) itself. On SQLite that is one SQL query
on the store's read connection, so a page stays fast at 100k rollouts (see
bench/bench_dashboard.py); any other backend is read through the Store interface, scanning at
most GENERIC_SCAN_LIMIT rollouts, which suits the in-memory store of a single run.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from agentkiln.adapter.credit import final_reward, reward_events
from agentkiln.models import MAX_OFFSET, FailureKind, Rollout, RolloutMode, RolloutStatus, Span
from agentkiln.protocol import SpanAttrs, SpanNames
from agentkiln.store.base import Store
from agentkiln.store.sqlite import SqliteStore
from agentkiln.store.sqlite_rows import dumps

GENERIC_SCAN_LIMIT = 20_000  # rollouts a non-SQLite backend is scanned for (newest first)
RECENT_S = 60.0  # the window of "rollouts/s" and the recent failure rate
PREVIEW_CHARS = 160
T = TypeVar("T")
CACHE_ABOVE_S = 0.05  # a summary slower than this is reused (see store_summary)
CACHE_FACTOR = 10.0
_summaries: weakref.WeakKeyDictionary[Store, tuple[float, StoreSummary]] = weakref.WeakKeyDictionary()


class RolloutFilter(BaseModel):
    """The rollouts table's filters and page (query parameters of the dashboard API)."""

    status: RolloutStatus | None = None
    mode: RolloutMode | None = None
    failure_kind: FailureKind | None = None
    agent: str | None = Field(default=None, max_length=128)
    version: int | None = Field(default=None, ge=1, description="resources version the rollout ran with")
    q: str | None = Field(default=None, max_length=200, description="text in the rollout id, input or metadata")
    limit: int = Field(default=50, ge=1, le=500)
    offset: int = Field(default=0, ge=0, le=MAX_OFFSET)


class RolloutRow(BaseModel):
    rollout_id: str
    status: RolloutStatus
    mode: RolloutMode | None = None
    created_at: float
    start_time: float | None = None
    end_time: float | None = None
    num_attempts: int = 0
    resources_id: str | None = None
    version: int | None = None
    failure_kind: str | None = None
    failure_message: str | None = None
    reward: float | None = None
    input_preview: str = ""


class RolloutPage(BaseModel):
    rows: list[RolloutRow]
    offset: int
    limit: int
    has_more: bool
    total: int | None = Field(default=None, description="rows matching the filters (None where not counted)")


class StoreSummary(BaseModel):
    rollouts_by_status: dict[str, int]
    queue_depth: int
    attempts_by_status: dict[str, int]
    failures_by_kind: dict[str, int]
    recent_finished: int
    rollouts_per_s: float
    recent_failures_by_kind: dict[str, int]
    recent_attempts: int
    scanned_all: bool = True


def _preview(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text[:PREVIEW_CHARS]


def _reward_of(spans: list[Span]) -> float | None:
    return final_reward(reward_events(spans))


async def _versions(store: Store) -> dict[str, int]:
    return {r.resources_id: r.version for r in await store.query_resources(limit=10_000)}


async def _resources_id_of(store: Store, version: int) -> str | None:
    return next((rid for rid, v in (await _versions(store)).items() if v == version), None)


# --------------------------------------------------------------------------- SQLite


def _read_only(path: str, fn: Callable[[sqlite3.Connection], T]) -> T:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0, isolation_level=None)
    try:
        conn.execute("BEGIN")  # one snapshot for all of fn's queries
        return fn(conn)
    finally:
        conn.close()


async def _sql(store: SqliteStore, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run a dashboard read on its own read-only connection in a worker thread.

    These reads scan tables (up to a few hundred ms at 100k rollouts), so they run neither on
    the event loop, where the gateway serves, nor on the store's database thread, where span
    writes commit; WAL lets them read beside the writers.
    """
    if store.path == ":memory:":  # only the database thread's connection sees an in-memory file
        return await store._call(fn, write=False)
    return await asyncio.to_thread(_read_only, store.path, fn)


def _sqlite_page(conn: sqlite3.Connection, f: RolloutFilter, resources_id: str | None) -> tuple[list, int]:
    where, args = [], []
    if f.status is not None:
        where.append("r.status = ?")
        args.append(f.status.value)
    if f.mode is not None:
        where.append("r.mode = ?")
        args.append(f.mode.value)
    if f.version is not None:
        where.append("r.resources_id IS ?")
        args.append(resources_id or "\0no such version")
    if f.failure_kind is not None:
        # One pass over the attempts (SQLite builds the IN set once), not one lookup per rollout.
        where.append(
            "r.rollout_id IN (SELECT rollout_id FROM attempts WHERE error IS NOT NULL "
            "AND json_extract(error, '$.kind') = ?)"
        )
        args.append(f.failure_kind.value)
    if f.agent:
        where.append(
            "EXISTS (SELECT 1 FROM spans s WHERE s.rollout_id = r.rollout_id AND s.name = ? "
            "AND json_extract(s.attributes, '$.\"kiln.agent.name\"') = ?)"
        )
        args += [SpanNames.llm_call, f.agent]
    if f.q:
        like = "%" + f.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        where.append("(r.rollout_id LIKE ? ESCAPE '\\' OR r.input LIKE ? ESCAPE '\\' OR r.metadata LIKE ? ESCAPE '\\')")
        args += [like, like, like]
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    sql = (
        "SELECT r.rollout_id, r.status, r.mode, substr(r.input, 1, ?), r.resources_id, r.created_at, r.start_time, "
        "r.end_time, r.num_attempts, (SELECT a.error FROM attempts a WHERE a.rollout_id = r.rollout_id "
        "AND a.error IS NOT NULL ORDER BY a.sequence_id DESC LIMIT 1) "
        f"FROM rollouts r{clause} ORDER BY r.seq DESC LIMIT ? OFFSET ?"
    )
    rows = conn.execute(sql, (PREVIEW_CHARS, *args, f.limit + 1, f.offset)).fetchall()
    if len(rows) <= f.limit and (rows or f.offset == 0):  # the last page: no second pass to count
        return rows, f.offset + len(rows)
    return rows, conn.execute(f"SELECT count(*) FROM rollouts r{clause}", args).fetchone()[0]


def _sqlite_rewards(conn: sqlite3.Connection, rollout_ids: list[str]) -> dict[str, float | None]:
    """Final reward of each rollout's latest attempt (index lookups by rollout id)."""
    rows = conn.execute(
        "SELECT s.rollout_id, s.attempt_id, s.sequence_id, s.attributes FROM spans s "
        "WHERE s.rollout_id IN (SELECT value FROM json_each(?)) AND s.name = ? "
        "AND s.attempt_seq = (SELECT max(a.sequence_id) FROM attempts a WHERE a.rollout_id = s.rollout_id) "
        "ORDER BY s.rollout_id, s.sequence_id",
        (dumps(rollout_ids), SpanNames.reward),
    ).fetchall()
    spans: dict[str, list[Span]] = {}
    for rid, aid, seq, attrs in rows:
        spans.setdefault(rid, []).append(
            Span.model_construct(
                rollout_id=rid, attempt_id=aid, sequence_id=seq, name=SpanNames.reward, attributes=json.loads(attrs)
            )
        )
    return {rid: _reward_of(s) for rid, s in spans.items()}


async def _page_sqlite(store: SqliteStore, f: RolloutFilter) -> RolloutPage:
    versions = await _versions(store)
    resources_id = next((rid for rid, v in versions.items() if v == f.version), None) if f.version else None

    def op(conn: sqlite3.Connection) -> tuple[list, int, dict[str, float | None]]:
        rows, total = _sqlite_page(conn, f, resources_id)
        return rows, total, _sqlite_rewards(conn, [r[0] for r in rows[: f.limit]])

    rows, total, rewards = await _sql(store, op)
    out = []
    for rid, status, mode, preview, res_id, created, start, end, n, error in rows[: f.limit]:
        err = json.loads(error) if error else {}
        out.append(
            RolloutRow(
                rollout_id=rid,
                status=status,
                mode=mode,
                created_at=created,
                start_time=start,
                end_time=end,
                num_attempts=n,
                resources_id=res_id,
                version=versions.get(res_id) if res_id else None,
                failure_kind=err.get("kind"),
                failure_message=(err.get("message") or "")[:300] or None,
                reward=rewards.get(rid),
                input_preview=preview,
            )
        )
    return RolloutPage(rows=out, offset=f.offset, limit=f.limit, has_more=len(rows) > f.limit, total=total)


# --------------------------------------------------------------------------- any backend


async def _all_rollouts(store: Store, **filters: Any) -> tuple[list[Rollout], bool]:
    """Newest first, at most GENERIC_SCAN_LIMIT of them; the flag says whether that was all."""
    out: list[Rollout] = []
    offset, page = 0, 1000
    while len(out) < GENERIC_SCAN_LIMIT:
        batch = await store.query_rollouts(limit=page, offset=offset, **filters)
        out += batch
        offset += len(batch)
        if len(batch) < page:
            return out[::-1], True
    return out[::-1], False


async def _matches(store: Store, r: Rollout, f: RolloutFilter, resources_id: str | None) -> bool:
    if f.version is not None and r.resources_id != resources_id:
        return False
    if f.q and not any(f.q.lower() in _preview_full(v).lower() for v in (r.rollout_id, r.input, r.metadata)):
        return False
    if f.failure_kind is not None:
        attempts = await store.query_attempts(r.rollout_id)
        if not any(a.error is not None and a.error.kind == f.failure_kind for a in attempts):
            return False
    if f.agent:
        calls = await store.query_spans(r.rollout_id, name=SpanNames.llm_call)
        if not any((s.attributes or {}).get(SpanAttrs.agent_name) == f.agent for s in calls):
            return False
    return True


def _preview_full(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


async def _page_generic(store: Store, f: RolloutFilter) -> RolloutPage:
    versions = await _versions(store)
    resources_id = next((rid for rid, v in versions.items() if v == f.version), None) if f.version else None
    rollouts, complete = await _all_rollouts(store, status=[f.status] if f.status else None, mode=f.mode)
    matched = [r for r in rollouts if await _matches(store, r, f, resources_id)]
    page = matched[f.offset : f.offset + f.limit]
    rows = []
    for r in page:
        attempts = await store.query_attempts(r.rollout_id)
        failed = next((a for a in reversed(attempts) if a.error is not None), None)
        latest = attempts[-1].attempt_id if attempts else None
        rewards = await store.query_spans(r.rollout_id, attempt_id=latest, name=SpanNames.reward) if latest else []
        rows.append(
            RolloutRow(
                rollout_id=r.rollout_id,
                status=r.status,
                mode=r.mode,
                created_at=r.created_at,
                start_time=r.start_time,
                end_time=r.end_time,
                num_attempts=r.num_attempts,
                resources_id=r.resources_id,
                version=versions.get(r.resources_id or ""),
                failure_kind=failed.error.kind.value if failed and failed.error else None,
                failure_message=(failed.error.message[:300] or None) if failed and failed.error else None,
                reward=_reward_of(rewards),
                input_preview=_preview(r.input),
            )
        )
    return RolloutPage(
        rows=rows,
        offset=f.offset,
        limit=f.limit,
        has_more=len(matched) > f.offset + f.limit,
        total=len(matched) if complete else None,
    )


async def rollout_page(store: Store, f: RolloutFilter) -> RolloutPage:
    """One page of rollouts matching `f`, newest first."""
    if isinstance(store, SqliteStore):
        return await _page_sqlite(store, f)
    return await _page_generic(store, f)


# --------------------------------------------------------------------------- train rewards


async def latest_train_rewards(store: Store, limit: int) -> list[tuple[str, dict[str, Any], float | None]]:
    """(rollout id, metadata, final reward) of the newest `limit` succeeded train rollouts, oldest first."""
    if isinstance(store, SqliteStore):

        def op(conn: sqlite3.Connection) -> list[tuple[str, dict[str, Any], float | None]]:
            rows = conn.execute(
                "SELECT rollout_id, metadata FROM rollouts WHERE status = 'succeeded' AND mode = 'train' "
                "ORDER BY seq DESC LIMIT ?",
                (limit,),
            ).fetchall()[::-1]
            rewards = _sqlite_rewards(conn, [r[0] for r in rows])
            return [(rid, json.loads(meta), rewards.get(rid)) for rid, meta in rows]

        return await _sql(store, op)
    rollouts, _ = await _all_rollouts(store, status=[RolloutStatus.succeeded], mode=RolloutMode.train)
    out = []
    for r in rollouts[:limit][::-1]:
        spans = await store.query_spans(r.rollout_id, attempt_id="latest", name=SpanNames.reward)
        out.append((r.rollout_id, r.metadata, _reward_of(spans)))
    return out


# --------------------------------------------------------------------------- summary


def _sqlite_summary(conn: sqlite3.Connection, since: float) -> dict[str, Any]:
    """One pass over each table (neither has an index on end_time or the error's kind)."""
    by_status: dict[str, int] = {}
    recent = 0
    for status, is_recent, n in conn.execute(
        "SELECT status, coalesce(end_time >= ?, 0), count(*) FROM rollouts GROUP BY 1, 2", (since,)
    ):
        by_status[status] = by_status.get(status, 0) + n
        if is_recent and RolloutStatus(status).finished:
            recent += n
    attempts: dict[str, int] = {}
    kinds: dict[str, int] = {}
    recent_kinds: dict[str, int] = {}
    recent_attempts = 0
    for status, kind, is_recent, n in conn.execute(
        "SELECT status, CASE WHEN error IS NULL THEN NULL ELSE json_extract(error, '$.kind') END, "
        "coalesce(end_time >= ?, 0), count(*) FROM attempts GROUP BY 1, 2, 3",
        (since,),
    ):
        attempts[status] = attempts.get(status, 0) + n
        recent_attempts += n if is_recent else 0
        if kind:
            kinds[kind] = kinds.get(kind, 0) + n
            if is_recent:
                recent_kinds[kind] = recent_kinds.get(kind, 0) + n
    return {
        "rollouts_by_status": by_status,
        "attempts_by_status": attempts,
        "failures_by_kind": kinds,
        "recent_finished": recent,
        "recent_failures_by_kind": recent_kinds,
        "recent_attempts": recent_attempts,
    }


async def _generic_summary(store: Store, since: float) -> dict[str, Any]:
    rollouts, complete = await _all_rollouts(store)
    by_status: dict[str, int] = {}
    attempts: dict[str, int] = {}
    kinds: dict[str, int] = {}
    recent_kinds: dict[str, int] = {}
    recent = recent_attempts = 0
    for r in rollouts:
        by_status[r.status.value] = by_status.get(r.status.value, 0) + 1
        if r.status.finished and (r.end_time or 0) >= since:
            recent += 1
        if r.num_attempts == 0:
            continue
        for a in await store.query_attempts(r.rollout_id):
            attempts[a.status.value] = attempts.get(a.status.value, 0) + 1
            is_recent = (a.end_time or 0) >= since
            recent_attempts += is_recent
            if a.error is not None:
                kinds[a.error.kind.value] = kinds.get(a.error.kind.value, 0) + 1
                if is_recent:
                    recent_kinds[a.error.kind.value] = recent_kinds.get(a.error.kind.value, 0) + 1
    return {
        "rollouts_by_status": by_status,
        "attempts_by_status": attempts,
        "failures_by_kind": kinds,
        "recent_finished": recent,
        "recent_failures_by_kind": recent_kinds,
        "recent_attempts": recent_attempts,
        "scanned_all": complete,
    }


async def store_summary(store: Store, now: float | None = None) -> StoreSummary:
    """Counts for the overview page and the /metrics gauges (computed when asked, never per request).

    They scan the store, so a summary that took long (a big store) is reused for CACHE_FACTOR
    times as long: open dashboard tabs and a Prometheus scraper then cost at most about
    1/CACHE_FACTOR of a core, and a small store is always counted afresh.
    """
    cached = _summaries.get(store)
    if now is None and cached is not None and time.monotonic() < cached[0]:
        return cached[1]
    started = time.monotonic()
    since = (now if now is not None else time.time()) - RECENT_S
    if isinstance(store, SqliteStore):
        data = await _sql(store, lambda conn: _sqlite_summary(conn, since))
    else:
        data = await _generic_summary(store, since)
    by_status = data["rollouts_by_status"]
    summary = StoreSummary(
        **data,
        queue_depth=by_status.get("queuing", 0) + by_status.get("requeuing", 0),
        rollouts_per_s=round(data["recent_finished"] / RECENT_S, 3),
    )
    took = time.monotonic() - started
    if took > CACHE_ABOVE_S:
        _summaries[store] = (time.monotonic() + CACHE_FACTOR * took, summary)
    return summary
