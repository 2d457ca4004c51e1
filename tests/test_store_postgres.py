"""PostgreSQL specifics: migrations, several stores (replicas) on one database, NOTIFY wake-ups, the sweep lock.

The Store contract itself runs against PostgreSQL in test_store_parity / test_store_lifecycle
(the `postgres` store kind). Skipped without a server, failed in CI (see pg_fixtures).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest

from agentkiln.models import AttemptStatus, LLMEndpoint, ResourcesIn, RolloutConfig, RolloutStatus
from agentkiln.store import StoreError, ValidationError, open_store
from tests.pg_fixtures import fresh_schema, import_psycopg_or_skip_module

psycopg = import_psycopg_or_skip_module()
from agentkiln.store.postgres import SCHEMA_VERSION, PostgresStore
from agentkiln.store.postgres.schema import LOCK_SWEEP


@pytest.fixture
async def pg() -> AsyncIterator[tuple[str, str]]:
    async with fresh_schema() as url_schema:
        yield url_schema


@pytest.fixture
async def two(pg: tuple[str, str]) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two stores with their own pools on one schema, as two `kiln serve` replicas would be."""
    url, schema = pg
    a = PostgresStore(url, schema=schema, sweep_interval_s=None, pool_size=8)
    b = PostgresStore(url, schema=schema, sweep_interval_s=None, pool_size=8)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def _versions(url: str, schema: str) -> list[int]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(f'SELECT version FROM "{schema}".kiln_schema_version ORDER BY version')
        return [row[0] for row in await cur.fetchall()]


# --------------------------------------------------------------------------- migrations


async def test_migrations_apply_once(pg: tuple[str, str], caplog: pytest.LogCaptureFixture) -> None:
    url, schema = pg
    with caplog.at_level(logging.INFO, logger="agentkiln.store.postgres.schema"):
        # Three stores opening at once on an empty schema: the advisory lock lets one migrate.
        stores = [PostgresStore(url, schema=schema) for _ in range(3)]
        await asyncio.gather(*(s.open() for s in stores))
        rid = (await stores[0].enqueue_rollout("kept")).rollout_id
        for s in stores:
            await s.close()
        applied = [r for r in caplog.records if "applying store schema version" in r.getMessage()]
        assert len(applied) == SCHEMA_VERSION
        caplog.clear()
        async with PostgresStore(url, schema=schema) as again:  # a second start is a no-op
            assert (await again.get_rollout(rid)).input == "kept"
    assert not [r for r in caplog.records if "applying store schema version" in r.getMessage()]
    assert await _versions(url, schema) == list(range(1, SCHEMA_VERSION + 1))


async def test_newer_schema_version_is_refused(pg: tuple[str, str]) -> None:
    url, schema = pg
    async with PostgresStore(url, schema=schema) as store:
        await store.open()
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(f'INSERT INTO "{schema}".kiln_schema_version VALUES (%s, 0)', (SCHEMA_VERSION + 1,))
    store = PostgresStore(url, schema=schema)
    with pytest.raises(StoreError, match=f"version {SCHEMA_VERSION + 1}, newer than this agentkiln"):
        await store.open()
    await store.close()


async def test_unreachable_server_fails_at_open_with_a_clear_error_and_a_later_call_retries(
    pg: tuple[str, str],
) -> None:
    url, schema = pg
    store = PostgresStore("postgresql://root@127.0.0.1:1/test", schema=schema, open_timeout_s=0.5)
    with pytest.raises(ConnectionError, match="cannot reach PostgreSQL at postgresql://root@127.0.0.1:1/test"):
        await store.enqueue_rollout("lost")
    store.url = url  # the database is back (here: found at its address)
    assert (await store.enqueue_rollout("kept")).input == "kept"
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.get_rollout("ro-x")


def test_open_store_dispatches_postgres_urls() -> None:
    for url in ("postgresql://root@127.0.0.1/test?schema=kiln_a", "postgres://root@127.0.0.1/test?schema=kiln_a"):
        store = open_store(url)
        assert isinstance(store, PostgresStore) and store.schema == "kiln_a" and "schema" not in store.url
    with pytest.raises(ValueError, match="plain identifier"):
        PostgresStore("postgresql://root@127.0.0.1/test?schema=a;drop")


async def test_sessions_commit_durably_and_url_options_still_apply(pg: tuple[str, str]) -> None:
    """synchronous_commit=on whatever the server's default; options in the URL reach libpq intact."""
    url, schema = pg
    settings = "SELECT current_setting('synchronous_commit'), current_setting('statement_timeout'), current_schema()"
    for extra, expected in (("", ("on", "0")), ("&options=-c%20statement_timeout%3D1234", ("on", "1234ms"))):
        async with PostgresStore(f"{url}?schema={schema}{extra}") as store:
            got = await store._read(lambda conn: _fetch_one(conn, settings))
            # asked for on every session, not left to the server's default (on here, so also checked directly)
            assert store._pool.kwargs["options"].startswith("-c synchronous_commit=on")
        assert got == (*expected, schema)


async def _fetch_one(conn, query: str):
    return await (await conn.execute(query)).fetchone()


# --------------------------------------------------------------------------- values


async def test_key_order_is_kept_and_unstorable_values_are_422(pg: tuple[str, str]) -> None:
    """Dicts come back in the order written, as from SQLite (the first llm is the default endpoint)."""
    url, schema = pg
    async with PostgresStore(url, schema=schema) as store:
        r = await store.enqueue_rollout({"zeta": 1, "alpha": 2, "mid": {"b": 1, "a": 2}}, metadata={"y": 1, "x": 2})
        got = await store.get_rollout(r.rollout_id)
        assert list(got.input) == ["zeta", "alpha", "mid"] and list(got.input["mid"]) == ["b", "a"]
        assert list(got.metadata) == ["y", "x"]
        llms = {"second": LLMEndpoint(model="m2"), "first": LLMEndpoint(model="m1")}
        res = await store.add_resources(ResourcesIn(llms=llms))
        assert list((await store.get_resources(res.resources_id)).llms) == ["second", "first"]
        with pytest.raises(ValidationError, match="PostgreSQL cannot store"):
            await store.enqueue_rollout({"x": float("nan")})  # not JSON to PostgreSQL
        assert [x.rollout_id for x in await store.query_rollouts()] == [r.rollout_id]


# --------------------------------------------------------------------------- replicas


async def test_rollout_enqueued_on_one_store_is_dequeued_on_the_other(two) -> None:
    a, b = two
    r = await a.enqueue_rollout({"q": 1})
    ar = await b.dequeue_rollout(worker_id="wb")
    assert ar is not None and ar.rollout.rollout_id == r.rollout_id and ar.attempt.worker_id == "wb"
    assert (await a.get_rollout(r.rollout_id)).status == RolloutStatus.running
    assert await a.attempt_statuses(r.rollout_id) == {ar.attempt.attempt_id: AttemptStatus.running}


async def test_attempt_statuses_is_one_statement(pg: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway asks before every recorded LLM call: one query, no transaction around it."""
    url, schema = pg
    async with PostgresStore(url, schema=schema, sweep_interval_s=None) as store:
        ar = await store.start_rollout("x")
        sent: list[str] = []
        execute = psycopg.AsyncConnection.execute

        async def counting(self, query, *args, **kwargs):
            sent.append(str(query))
            return await execute(self, query, *args, **kwargs)

        monkeypatch.setattr(psycopg.AsyncConnection, "execute", counting)
        assert await store.attempt_statuses(ar.rollout.rollout_id) == {ar.attempt.attempt_id: AttemptStatus.running}
        assert len(sent) == 1 and "LEFT JOIN attempts" in sent[0]


async def test_concurrent_dequeues_from_two_stores_never_duplicate(two) -> None:
    a, b = two
    ids = [r.rollout_id for r in await a.enqueue_rollouts([{"input": i} for i in range(200)])]

    async def drain(store: PostgresStore, worker: str) -> list[str]:
        got = []
        while (ar := await store.dequeue_rollout(worker_id=worker)) is not None:
            got.append(ar.rollout.rollout_id)
        return got

    results = await asyncio.gather(*(drain(s, f"{n}{i}") for s, n in ((a, "a"), (b, "b")) for i in range(8)))
    flat = [rid for got in results for rid in got]
    assert len(flat) == len(set(flat)) == 200 and set(flat) == set(ids)
    assert sum(1 for got in results[:8] for _ in got) > 0 and sum(1 for got in results[8:] for _ in got) > 0
    for got in results:  # each dequeuer still sees FIFO order
        assert got == sorted(got, key=ids.index)


async def test_wait_on_one_store_wakes_when_the_other_finishes(pg: tuple[str, str]) -> None:
    """NOTIFY, not polling: the waiter's fallback poll is 30 s, it wakes within a second."""
    url, schema = pg
    async with (
        PostgresStore(url, schema=schema, sweep_interval_s=None, poll_s=30) as a,
        PostgresStore(url, schema=schema, sweep_interval_s=None, poll_s=30) as b,
    ):
        r = await a.enqueue_rollout("x")
        ar = await b.dequeue_rollout()
        waiter = asyncio.create_task(a.wait_for_rollouts([r.rollout_id], timeout=20))
        await asyncio.sleep(0.3)  # the waiter has read the rollout (running) and sleeps
        assert not waiter.done()
        started = time.monotonic()
        await b.update_attempt(r.rollout_id, ar.attempt.attempt_id, status=AttemptStatus.succeeded)
        [done] = await asyncio.wait_for(waiter, 5)
        assert done.status == RolloutStatus.succeeded
        assert time.monotonic() - started < 2.0


async def test_waiters_still_wake_after_the_listener_connection_is_lost(pg: tuple[str, str]) -> None:
    url, schema = pg
    async with (
        PostgresStore(url, schema=schema, sweep_interval_s=None, poll_s=30) as a,
        PostgresStore(url, schema=schema, sweep_interval_s=None, poll_s=30) as b,
    ):
        r = await a.enqueue_rollout("x")
        ar = await b.dequeue_rollout()
        waiter = asyncio.create_task(a.wait_for_rollouts([r.rollout_id], timeout=20))
        await asyncio.sleep(0.3)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
            cur = await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE %s", (f'LISTEN "{a.channel}"',)
            )
            assert [row[0] for row in await cur.fetchall()] == [True]
        await asyncio.sleep(0.2)  # lost: a finish now goes unheard, the reconnect makes waiters re-read
        await b.update_attempt(r.rollout_id, ar.attempt.attempt_id, status=AttemptStatus.succeeded)
        [done] = await asyncio.wait_for(waiter, 5)
        assert done.status == RolloutStatus.succeeded


async def test_sweep_runs_once_across_stores(two, pg: tuple[str, str]) -> None:
    a, b = two
    _, schema = pg
    cfg = RolloutConfig(timeout_s=1)
    await a.enqueue_rollouts([{"input": i, "config": cfg} for i in range(20)])
    started = [await a.dequeue_rollout() for _ in range(20)]
    later = max(ar.attempt.start_time for ar in started) + 5
    # While another replica holds the sweep lock, a sweep changes nothing (and does not wait).
    async with await psycopg.AsyncConnection.connect(a.url) as other, other.transaction():
        await other.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_SWEEP, schema))
        assert await asyncio.wait_for(b.check_timeouts(now=later), 2) == []
    results = await asyncio.gather(*(s.check_timeouts(now=later) for s in (a, b, a, b)))
    swept = [att.attempt_id for got in results for att in got]
    assert sorted(swept) == sorted(ar.attempt.attempt_id for ar in started)  # each attempt judged once
    assert {r.status for r in await a.query_rollouts(limit=100)} == {RolloutStatus.failed}


async def test_served_over_http(pg: tuple[str, str]) -> None:
    """`kiln serve` on PostgreSQL: the store runs on uvicorn's loop; a long poll is answered by NOTIFY."""
    from agentkiln.server.app import create_app
    from agentkiln.server.serve import ServerThread, own_resources
    from agentkiln.store.client import HttpStore

    url, schema = pg
    app = create_app(PostgresStore(url, schema=schema, poll_s=30))
    own_resources(app, app.state.store)  # closed on the server's loop when it stops
    server = ServerThread(app)
    try:
        async with HttpStore(server.start()) as client, PostgresStore(url, schema=schema) as other:
            r = await client.enqueue_rollout({"q": 1})
            ar = await other.dequeue_rollout()  # another replica takes and finishes it
            waiter = asyncio.create_task(client.wait_for_rollouts([r.rollout_id], timeout=20))
            await asyncio.sleep(0.3)
            await other.update_attempt(r.rollout_id, ar.attempt.attempt_id, status=AttemptStatus.succeeded)
            started = time.monotonic()
            [done] = await asyncio.wait_for(waiter, 10)
            assert done.status == RolloutStatus.succeeded and time.monotonic() - started < 3
    finally:
        server.stop()


# --------------------------------------------------------------------------- learning from use


async def test_version_1_schema_upgrades_for_sessions(pg: tuple[str, str]) -> None:
    """A schema migrated to version 1 with data: version 2 re-keys attempts and backfills the response-id index."""
    from agentkiln.models import FeedbackIn, SpanIn
    from agentkiln.protocol import SESSION_ATTEMPT_ID, SpanAttrs, SpanNames
    from agentkiln.store.postgres.schema import MIGRATIONS, migrate

    url, schema = pg
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, options=f"-c search_path={schema}") as conn:
        await migrate(conn, schema, {1: MIGRATIONS[1]})
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(f'SET search_path = "{schema}"')
        await conn.execute(
            "INSERT INTO rollouts (rollout_id, status, mode, input, config, metadata, created_at, num_attempts) "
            "VALUES ('ro-old', 'running', 'train', '1', '{}', '{}', 1, 1)"
        )
        await conn.execute(
            "INSERT INTO attempts (attempt_id, rollout_id, sequence_id, status, start_time, last_heartbeat) "
            "VALUES ('at-old', 'ro-old', 1, 'running', 1, 1)"
        )
        attrs = f'{{"{SpanAttrs.call_id}": "old-call", "{SpanAttrs.model_version}": "v3"}}'
        await conn.execute(
            "INSERT INTO spans (rollout_id, attempt_id, attempt_seq, sequence_id, name, trace_id, span_id, start_time, "
            "attributes, events, status, resource) VALUES ('ro-old', 'at-old', 1, 1, %s, 't', 's-old', 1, %s, '[]', "
            "'{\"code\": \"UNSET\"}', '{}')",
            (SpanNames.llm_call, attrs),
        )
    async with PostgresStore(url, schema=schema, sweep_interval_s=None) as store:
        fb = await store.add_feedback(FeedbackIn(response_id="old-call", value=1))
        assert (fb.rollout_id, fb.attempt_id, fb.resolved_span_id, fb.model_version) == ("ro-old", "at-old", "s-old",
                                                                                         "v3")  # fmt: skip
        for sid in ("one", "two"):  # both attempts are "live": the key is (rollout_id, attempt_id) now
            s = await store.open_session(sid)
            await store.add_span(SpanIn(rollout_id=s.rollout.rollout_id, attempt_id=SESSION_ATTEMPT_ID, name="x"))
    assert await _versions(url, schema) == list(range(1, SCHEMA_VERSION + 1))


async def test_replicas_race_on_sessions_feedback_and_canaries(two: tuple[PostgresStore, PostgresStore]) -> None:
    from agentkiln.models import CanaryDecision, CanaryIn, FeedbackIn
    from agentkiln.store import InvalidTransitionError

    a, b = two
    opened = await asyncio.gather(*(s.open_session("shared") for s in (a, b) for _ in range(5)))
    assert len({o.rollout.rollout_id for o in opened}) == 1
    posts = await asyncio.gather(
        *(s.add_feedback(FeedbackIn(session_id="shared", value=1, client_id="same")) for s in (a, b, a, b))
    )
    assert len({p.feedback_id for p in posts}) == 1 and len(await a.query_feedback()) == 1
    base = await a.add_resources(ResourcesIn())
    cand = await a.add_resources(ResourcesIn(candidate=True))
    started = await asyncio.gather(
        *(s.start_canary(CanaryIn(candidate_resources_id=cand.resources_id)) for s in (a, b, a, b)),
        return_exceptions=True,
    )
    won = [c for c in started if not isinstance(c, BaseException)]
    assert len(won) == 1 and all(isinstance(e, InvalidTransitionError) for e in started if e not in won)
    assert won[0].baseline_resources_id == base.resources_id
    decided = await asyncio.gather(
        *(
            s.decide_canary(won[0].canary_id, CanaryDecision(action=act))
            for s in (a, b)
            for act in ("promote", "rollback")
        ),
        return_exceptions=True,
    )
    assert sum(not isinstance(d, BaseException) for d in decided) == 1
    assert len((await b.get_canary(won[0].canary_id)).decisions) == 2
