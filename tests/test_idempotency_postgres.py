"""Answers to keyed writes shared by replicas in PostgreSQL: one claimant, replays elsewhere, leases, expiry.

Two stores on one schema stand for two `kiln serve` replicas (tests/test_replicas.py runs real
ones). Skipped without a server, failed in CI (see pg_fixtures).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from agentkiln.store.idempotency import IdempotencyBusy, IdempotencyKey, StoredAnswer
from tests.pg_fixtures import fresh_schema, import_psycopg_or_skip_module

psycopg = import_psycopg_or_skip_module()
from agentkiln.store.postgres import PostgresStore
from agentkiln.store.postgres.idempotency import PostgresIdempotency

KEY = IdempotencyKey("POST", "/api/v1/rollouts", b"k-1")
ANSWER = StoredAnswer(200, [(b"content-type", b"application/json"), (b"x-odd", b"\xe9")], b'{"rollout_id":"r-1"}')


@pytest.fixture
async def two() -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    async with fresh_schema() as (url, schema):
        a = PostgresStore(url, schema=schema, sweep_interval_s=None)
        b = PostgresStore(url, schema=schema, sweep_interval_s=None)
        try:
            yield a, b
        finally:
            await a.close()
            await b.close()


def _cache(store: PostgresStore, **kw: float) -> PostgresIdempotency:
    return PostgresIdempotency(store, **kw)


async def _rows(store: PostgresStore) -> int:
    async def op(conn):  # type: ignore[no-untyped-def]
        return (await (await conn.execute("SELECT count(*) FROM idempotency_answers")).fetchone())[0]

    return await store._read(op)


async def test_the_store_hands_every_server_one_shared_cache(two) -> None:
    a, _ = two
    assert isinstance(a.idempotency_cache(), PostgresIdempotency) and a.idempotency_cache() is a.idempotency_cache()


async def test_one_claimant_and_a_retry_on_the_other_replica_waits_for_its_answer(two) -> None:
    a, b = (_cache(s) for s in two)
    assert await a.begin(KEY) is None  # A runs the write
    retry = asyncio.create_task(b.begin(KEY))
    await asyncio.sleep(0.3)
    assert not retry.done()  # B waits while A's write runs
    await a.finish(KEY, ANSWER)
    assert await asyncio.wait_for(retry, 5) == ANSWER  # replayed byte for byte, odd header bytes too
    assert await a.begin(KEY) == ANSWER  # and later, on either
    assert await b.begin(IdempotencyKey("POST", "/api/v1/dequeue", b"k-1")) is None  # another route: another write


async def test_concurrent_first_tries_on_both_replicas_elect_exactly_one(two) -> None:
    caches = [_cache(s) for s in two for _ in range(4)]  # four servers' caches on each store
    keys = [IdempotencyKey("POST", "/api/v1/rollouts", b"race-%d" % i) for i in range(10)]

    async def attempt(cache: PostgresIdempotency, key: IdempotencyKey) -> bool:
        got = await cache.begin(key)
        if got is None:
            await asyncio.sleep(0.05)  # the write runs a while: the others must wait, not run it
            await cache.finish(key, StoredAnswer(200, [], key.key))
            return True
        assert got.body == key.key
        return False

    ran = await asyncio.gather(*(attempt(c, k) for k in keys for c in caches))
    assert sum(ran) == len(keys)  # each key's write ran once


async def test_a_failed_write_is_released_and_its_retry_runs(two) -> None:
    a, b = (_cache(s) for s in two)
    assert await a.begin(KEY) is None
    retry = asyncio.create_task(b.begin(KEY))
    await asyncio.sleep(0.1)
    await a.finish(KEY, None)  # a 5xx or a lost connection: nothing a retry may be given
    assert await asyncio.wait_for(retry, 5) is None  # B now holds the key and runs it
    await b.finish(KEY, ANSWER)
    assert await a.begin(KEY) == ANSWER


async def test_a_claim_whose_server_died_is_taken_over_after_its_lease(two) -> None:
    dead, b = _cache(two[0], lease_s=0.5), _cache(two[1])
    assert await dead.begin(KEY) is None
    dead._renewing.pop(KEY).cancel()  # the process is gone: no renewals, no finish
    assert await asyncio.wait_for(b.begin(KEY), 5) is None  # taken over once the lease lapsed
    await dead.finish(KEY, StoredAnswer(500, [], b"late"))  # the old claimant's late answer is not kept
    await b.finish(KEY, ANSWER)
    assert await dead.begin(KEY) == ANSWER


async def test_a_live_claim_keeps_its_lease_and_the_wait_is_bounded(two) -> None:
    a, b = _cache(two[0], lease_s=0.3), _cache(two[1], wait_s=1.0)
    assert await a.begin(KEY) is None  # renewed every 0.1 s while the (long) write runs
    with pytest.raises(IdempotencyBusy, match="still running on another server"):
        await b.begin(KEY)
    await a.finish(KEY, ANSWER)
    assert await b.begin(KEY) == ANSWER


async def test_expired_answers_are_reclaimed_and_purged(two) -> None:
    a, b = _cache(two[0], ttl_s=0.2), _cache(two[1], ttl_s=0.2, purge_every_s=0)
    assert await a.begin(KEY) is None
    await a.finish(KEY, ANSWER)
    other = IdempotencyKey("POST", "/api/v1/rollouts", b"k-2")
    assert await a.begin(other) is None
    await a.finish(other, ANSWER)
    await asyncio.sleep(0.4)
    assert await b.begin(KEY) is None  # expired: the write runs again (and the claim purges the other row)
    assert await _rows(two[0]) == 1


async def test_the_middleware_answers_a_retry_still_waiting_503_with_retry_after(two) -> None:
    """Past the bounded wait the retry is told to come back (HttpStore retries 503s with the same key)."""
    from agentkiln.server.idempotency import IdempotencyMiddleware

    holder = _cache(two[0])
    assert await holder.begin(KEY) is None  # the first try runs on the other replica and does not finish

    async def never(scope, receive, send):  # type: ignore[no-untyped-def]
        raise AssertionError("the retry must not run the write")

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    middleware = IdempotencyMiddleware(never, cache=_cache(two[1], wait_s=0.3))
    scope = {"type": "http", "method": KEY.method, "path": KEY.path, "headers": [(b"idempotency-key", KEY.key)]}
    await middleware(scope, None, send)  # type: ignore[arg-type]
    assert sent[0]["status"] == 503 and (b"retry-after", b"1") in sent[0]["headers"]
    assert b"IdempotencyBusy" in sent[1]["body"]
    await holder.finish(KEY, ANSWER)
