"""What a keyed write's shared Idempotency-Key answer costs on PostgreSQL: claim + answer, with and without fsync.

Replicas share answers in the `idempotency_answers` table (agentkiln/store/postgres/idempotency.py);
each keyed write claims its key and stores its answer in two transactions. Those rows commit
with `synchronous_commit = off` (visible to every replica at once; only a database crash can
lose one, and then the retry runs again). This bench runs the same claim + answer loop with
that setting and with the WAL flush waited for, taking turns, and prints the ratio.

Run: .venv/bin/python bench/bench_idempotency_postgres.py [--writes 200] [--rounds 3]
(PostgreSQL at KILN_TEST_POSTGRES_URL, default postgresql://postgres@127.0.0.1:5432/test)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentkiln.store.idempotency import IdempotencyKey, StoredAnswer  # noqa: E402
from agentkiln.store.postgres import PostgresStore  # noqa: E402
from agentkiln.store.postgres import idempotency as shared  # noqa: E402
from tests.pg_fixtures import fresh_schema  # noqa: E402

ANSWER = StoredAnswer(200, [(b"content-type", b"application/json")], b'{"rollout_id":"r-1"}')
SETTINGS = {"no-fsync (shipped)": shared._NO_FSYNC, "fsync": "SELECT 1"}


async def per_write_ms(cache: shared.PostgresIdempotency, label: str, writes: int, round_: int) -> float:
    start = time.perf_counter()
    for i in range(writes):
        key = IdempotencyKey("POST", "/api/v1/rollouts", f"{label}-{round_}-{i}".encode())
        await cache.begin(key)
        await cache.finish(key, ANSWER)
    return (time.perf_counter() - start) / writes * 1000


async def main(writes: int, rounds: int) -> None:
    async with fresh_schema() as (url, schema):
        store = PostgresStore(url, schema=schema, sweep_interval_s=None)
        cache = shared.PostgresIdempotency(store)
        try:
            await per_write_ms(cache, "warm", 10, 0)
            times: dict[str, list[float]] = {label: [] for label in SETTINGS}
            for round_ in range(rounds):
                for label, statement in SETTINGS.items():
                    shared._NO_FSYNC = statement
                    times[label].append(await per_write_ms(cache, label, writes, round_))
        finally:
            shared._NO_FSYNC = SETTINGS["no-fsync (shipped)"]
            await store.close()
    medians = {label: statistics.median(v) for label, v in times.items()}
    for label, ms in medians.items():
        print(f"{label:>20}: {ms:.2f} ms per keyed write (claim + answer), median of {rounds} x {writes}")
    print(f"fsync / no-fsync: {medians['fsync'] / medians['no-fsync (shipped)']:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.writes, args.rounds))
