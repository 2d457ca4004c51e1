"""Answers to keyed writes in the database, so every replica on it replays them (IdempotencyCache).

A write's key is claimed with one `INSERT ... ON CONFLICT`: exactly one replica gets the row and
runs the write, then stores the answer in it. A retry elsewhere finds the row: the answer is
replayed; while it is still pending the retry polls for it, up to `wait_s`, then is told to come
back (IdempotencyBusy). The claimant renews a lease on the row while its write runs (LLM calls can
be long), so a claim whose replica died is taken over once its lease lapses instead of blocking
the key for the whole ttl. Times come from the database's clock: replicas' clocks may differ.
Rows expire after `ttl_s`; an expired row is reclaimed in place, and each replica deletes all
expired rows at most every `purge_every_s`, on a claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid

from agentkiln.store.idempotency import IdempotencyBusy, IdempotencyKey, StoredAnswer
from agentkiln.store.postgres.connections import Conn, PostgresConnections

log = logging.getLogger(__name__)

_NOW = "extract(epoch from clock_timestamp())"
# Claim: a new row, or one whose answer expired, or a pending one whose claimant's lease lapsed.
_CLAIM_SQL = (
    "INSERT INTO idempotency_answers AS t (key_hash, owner, expires_at, lease_until) "
    f"VALUES (%(k)s, %(o)s, {_NOW} + %(ttl)s, {_NOW} + %(lease)s) "
    "ON CONFLICT (key_hash) DO UPDATE SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at, "
    "lease_until = EXCLUDED.lease_until, status = NULL, headers = NULL, body = NULL "
    f"WHERE t.expires_at < {_NOW} OR (t.status IS NULL AND t.lease_until < {_NOW}) RETURNING 1"
)
_READ_SQL = f"SELECT status, headers::text, body FROM idempotency_answers WHERE key_hash = %s AND expires_at >= {_NOW}"
_ANSWER_SQL = (
    "UPDATE idempotency_answers SET status = %s, headers = %s::json, body = %s, lease_until = NULL "
    "WHERE key_hash = %s AND owner = %s"
)
_RELEASE_SQL = "DELETE FROM idempotency_answers WHERE key_hash = %s AND owner = %s AND status IS NULL"
_RENEW_SQL = (
    f"UPDATE idempotency_answers SET lease_until = {_NOW} + %s WHERE key_hash = %s AND owner = %s AND status IS NULL"
)
_PURGE_SQL = f"DELETE FROM idempotency_answers WHERE expires_at < {_NOW}"

# The rows are visible to every replica at commit either way; only a database crash could lose one,
# and then a retry runs again, as after a restart of a lone server. Not waiting for the WAL flush
# spares each keyed write two fsyncs (the store's own rows keep synchronous_commit=on).
_NO_FSYNC = "SET LOCAL synchronous_commit = off"

FIRST_POLL_S = 0.02
MAX_POLL_S = 0.5


def _dump_headers(headers: list[tuple[bytes, bytes]]) -> str:
    return json.dumps([[k.decode("latin-1"), v.decode("latin-1")] for k, v in headers])


def _load_headers(text: str) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in json.loads(text)]


class PostgresIdempotency:
    """ttl_s: how long answers replay (10 min, as in memory); lease_s: how long a silent claim holds the key."""

    def __init__(
        self,
        conns: PostgresConnections,
        *,
        ttl_s: float = 600.0,
        lease_s: float = 30.0,
        wait_s: float = 60.0,
        purge_every_s: float = 60.0,
    ) -> None:
        self.conns = conns
        self.ttl_s = ttl_s
        self.lease_s = lease_s
        self.wait_s = wait_s
        self.purge_every_s = purge_every_s
        self._owner = uuid.uuid4().hex  # this cache's claims; a claim taken over is no longer ours to answer
        self._renewing: dict[IdempotencyKey, asyncio.Task[None]] = {}
        self._last_purge = 0.0

    async def begin(self, key: IdempotencyKey) -> StoredAnswer | None:
        digest = key.digest()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.wait_s
        poll = FIRST_POLL_S
        while True:
            if await self._claim(digest):
                self._renewing[key] = asyncio.create_task(self._renew(digest), name="kiln-idempotency-lease")
                await self._maybe_purge()
                return None
            row = await self.conns._read(lambda conn: _fetch(conn, digest))
            if row is not None and row[0] is not None:
                return StoredAnswer(row[0], _load_headers(row[1]), bytes(row[2]))
            # Pending elsewhere, or released/expired since the claim failed: look again shortly.
            if loop.time() >= give_up:
                raise IdempotencyBusy(
                    f"a request with this Idempotency-Key is still running on another server after {self.wait_s:g}s; "
                    "retry it later with the same key"
                )
            await asyncio.sleep(poll)
            poll = min(poll * 2, MAX_POLL_S)

    async def finish(self, key: IdempotencyKey, answer: StoredAnswer | None) -> None:
        renewing = self._renewing.pop(key, None)
        if renewing is not None:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
        digest = key.digest()
        if answer is None:  # nothing a retry may be given: let it run again
            await self._execute(_RELEASE_SQL, (digest, self._owner))
        else:
            args = (answer.status, _dump_headers(answer.headers), answer.body, digest, self._owner)
            await self._execute(_ANSWER_SQL, args)

    async def _claim(self, digest: bytes) -> bool:
        args = {"k": digest, "o": self._owner, "ttl": self.ttl_s, "lease": self.lease_s}

        async def op(conn: Conn, finished: list[str]) -> bool:
            await conn.execute(_NO_FSYNC)
            return await (await conn.execute(_CLAIM_SQL, args)).fetchone() is not None

        return await self.conns._write(op)

    async def _renew(self, digest: bytes) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self._execute(_RENEW_SQL, (self.lease_s, digest, self._owner))
            except Exception as exc:  # noqa: BLE001 - a missed renewal only risks a takeover later
                log.warning("could not renew an idempotency claim: %s", exc)

    async def _maybe_purge(self) -> None:
        if time.monotonic() - self._last_purge < self.purge_every_s:
            return
        self._last_purge = time.monotonic()
        await self._execute(_PURGE_SQL, ())

    async def _execute(self, statement: str, args: tuple[object, ...]) -> None:
        async def op(conn: Conn, finished: list[str]) -> None:
            await conn.execute(_NO_FSYNC)
            await conn.execute(statement, args)

        await self.conns._write(op)


async def _fetch(conn: Conn, digest: bytes) -> tuple | None:
    return await (await conn.execute(_READ_SQL, (digest,))).fetchone()
