"""Dashboard server time at 0, 10k and 100k stored rollouts (SQLite): rollouts page, filters, one rollout.

Each store holds N filler rollouts (built with the store's batch enqueue plus one executemany of
their attempts: 90% succeeded, 10% failed with a failure kind; reward spans on every 10th) and one
real rollout with LLM-call spans, which the one-rollout page opens. Requests go through the real
app in process (httpx ASGITransport), so the time is the server's: routing, auth, the store query
and JSON. Reports the median of REPEATS calls and the ratio to the empty store.

Run: HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_dashboard.py [--sizes 0 10000 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from agentkiln.dashboard import queries
from agentkiln.models import AttemptStatus, SpanIn, new_id
from agentkiln.protocol import LLMCall, SpanAttrs, SpanNames
from agentkiln.server.app import create_app
from agentkiln.store import SqliteStore
from agentkiln.store.sqlite_rows import dumps

REPEATS = 25
BATCH = 10_000
KINDS = ["tool_error", "llm_error", "parse_error", "timeout", "agent_exception"]


async def fill(store: SqliteStore, n: int) -> None:
    """n rollouts via enqueue_rollouts, then their attempts and some reward spans in direct inserts."""
    for start in range(0, n, BATCH):
        items = [
            {"input": {"question": f"What is {i} + {i % 97}?", "answer": i + i % 97}, "mode": "train",
             "metadata": {"group_id": f"s{i // 64}-{i % 8}"}}
            for i in range(start, min(n, start + BATCH))
        ]  # fmt: skip
        rollouts = await store.enqueue_rollouts(items)
        now = time.time()

        def op(conn, rollouts=rollouts, start=start, now=now):
            attempts, spans, updates = [], [], []
            for j, r in enumerate(rollouts):
                i = start + j
                failed = i % 10 == 9
                status = "failed" if failed else "succeeded"
                error = (
                    dumps({"kind": KINDS[(i // 10) % len(KINDS)], "message": f"filler failure {i}"}) if failed else None
                )
                aid = new_id("at")
                attempts.append((aid, r.rollout_id, 1, "w-1", status, now, now + 1, now + 1, error))
                updates.append((status, now, now + 1, r.rollout_id))
                if i % 10 == 0:
                    attrs = dumps({SpanAttrs.reward_value: 1.0, SpanAttrs.reward_final: True})
                    spans.append((r.rollout_id, aid, 1, 1, SpanNames.reward, "t", new_id("sp"), None, now, now,
                                  attrs, "[]", '{"code":"UNSET"}', "{}"))  # fmt: skip
            conn.executemany("INSERT INTO attempts (attempt_id, rollout_id, sequence_id, worker_id, status, start_time, "
                             "end_time, last_heartbeat, error) VALUES (?,?,?,?,?,?,?,?,?)", attempts)  # fmt: skip
            conn.executemany(
                "UPDATE rollouts SET status=?, start_time=?, end_time=?, num_attempts=1 WHERE rollout_id=?", updates
            )
            conn.executemany("INSERT INTO spans (rollout_id, attempt_id, attempt_seq, sequence_id, name, trace_id, "
                             "span_id, parent_id, start_time, end_time, attributes, events, status, resource) "
                             "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", spans)  # fmt: skip

        await store._call(op)  # the database thread runs it in one write transaction


async def real_rollout(store: SqliteStore) -> str:
    """One rollout as the gateway records it: 3 LLM calls with 48-token replies, a tool span, a reward."""
    ar = await store.start_rollout({"question": "What is 17 * 23?"}, mode="train")
    rid, aid = ar.rollout.rollout_id, ar.attempt.attempt_id
    messages = [{"role": "system", "content": "Use the calculator."}, {"role": "user", "content": "What is 17 * 23?"}]
    spans = []
    for k in range(3):
        call = LLMCall(
            agent="solver", call_id=f"c{k}", api="chat.completions", model_version="v1",
            request={"messages": messages * (k + 1)},
            response={"choices": [{"message": {"role": "assistant", "content": "391"}}]},
            prompt_ids=list(range(400 + 60 * k)), response_ids=list(range(48)), logprobs=[-0.5] * 48,
            finish_reason="stop",
        )  # fmt: skip
        spans.append(SpanIn(rollout_id=rid, attempt_id=aid, name=SpanNames.llm_call, attributes=call.attributes()))
    spans.append(SpanIn(rollout_id=rid, attempt_id=aid, name=SpanNames.tool, attributes={SpanAttrs.tool_name: "calc"}))
    spans.append(
        SpanIn(rollout_id=rid, attempt_id=aid, name=SpanNames.reward, attributes={SpanAttrs.reward_value: 1.0})
    )
    await store.add_spans(spans)
    await store.update_attempt(rid, aid, status=AttemptStatus.succeeded)
    return rid


async def time_get(client: httpx.AsyncClient, path: str) -> float:
    await client.get(path)  # warm
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        resp = await client.get(path)
        times.append(time.perf_counter() - t0)
        assert resp.status_code == 200, (path, resp.status_code, resp.text[:200])
    return statistics.median(times) * 1000


async def measure(n: int, folder: Path) -> dict[str, float]:
    store = SqliteStore(folder / f"bench-{n}.db", sweep_interval_s=None)
    t0 = time.perf_counter()
    await fill(store, n)
    rid = await real_rollout(store)
    build_s = time.perf_counter() - t0
    app = create_app(store, sweep_interval_s=0)
    paths = {
        "rollouts page (newest 50)": "/api/v1/dashboard/rollouts?limit=50",
        "page 100 (offset 5000)": "/api/v1/dashboard/rollouts?limit=50&offset=5000",
        "failure_kind=tool_error": "/api/v1/dashboard/rollouts?failure_kind=tool_error&limit=50",
        "status=failed": "/api/v1/dashboard/rollouts?status=failed&limit=50",
        "text search (no match)": "/api/v1/dashboard/rollouts?q=zebra&limit=50",
        "one rollout": f"/api/v1/dashboard/rollouts/{rid}",
        "overview (summary reused when slow)": "/api/v1/dashboard/overview",
        "/metrics (same)": "/metrics",
    }
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    await queries._sql(store, lambda conn: queries._sqlite_summary(conn, time.time() - queries.RECENT_S))
    out["summary, uncached (overview, /metrics)"] = (time.perf_counter() - t0) * 1000
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
        for name, path in paths.items():
            out[name] = await time_get(client, path)
    await store.close()
    print(f"  built {n} rollouts in {build_s:.1f}s", flush=True)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 10_000, 100_000])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {n: await measure(n, Path(tmp)) for n in args.sizes}
    base = results[args.sizes[0]]
    print("\n| request | " + " | ".join(f"{n:,} rollouts" for n in args.sizes) + " |")
    print("|---|" + "---|" * len(args.sizes))
    for name in base:
        cells = [f"{results[n][name]:.1f} ms" + (f" ({results[n][name] / base[name]:.1f}x)" if n != args.sizes[0] else "")
                 for n in args.sizes]  # fmt: skip
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    asyncio.run(main())
