"""agentlightning 0.3.0 side of bench_store_throughput.py; runs in .venv-agl (agentlightning installed).

`--serve`: the algorithm-process shape of agentlightning's client-server training: an
InMemoryLightningStore(thread_safe=True) behind LightningStoreServer (thread launch mode, as
ClientServerExecutionStrategy starts it) and an LLMProxy (LiteLLM, default middlewares and
callbacks, default "mp" launch mode: its own process, talking to the store over HTTP) whose
model list points at the mock backend. Prints `READY <store_url> <proxy_url>` and serves
until killed.

Default (client) mode: one timed round. Enqueues `--rollouts` rollouts (untimed), then
`--runners` coroutines each loop: dequeue_rollout, `--calls` chat completions through the
proxy's /rollout/{rid}/attempt/{aid}/v1 URL (spans recorded by the proxy), the reward span
the way LitAgentRunner adds it (get_next_span_sequence_id + add_span), then
update_attempt(succeeded). The round ends when every rollout is finished and all its spans
(calls + reward) are in the store (the proxy exports spans after answering, so they land
late). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mock_openai import FastClient

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network for the cost map
# Newer LiteLLM refuses to start its proxy without a master key; agentlightning's LLMProxy sets none
# (the LiteLLM it was released with did not ask), so allow that on loopback as it ran then.
os.environ.setdefault("LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY", "true")


async def serve(args: argparse.Namespace) -> None:
    import agentlightning as agl

    store = agl.InMemoryLightningStore(thread_safe=True)
    server = agl.LightningStoreServer(store, host="127.0.0.1", port=args.store_port, launch_mode="thread")
    await server.start()
    proxy = agl.LLMProxy(
        port=args.proxy_port,
        host="127.0.0.1",
        model_list=[
            {
                "model_name": "mock-model",
                "litellm_params": {"model": "hosted_vllm/mock-model", "api_base": args.mock_url},
            }
        ],
        store=server,
    )
    await proxy.start()
    print(f"READY http://127.0.0.1:{args.store_port} http://127.0.0.1:{args.proxy_port}", flush=True)
    try:
        while True:
            await asyncio.sleep(3600)
    finally:
        await proxy.stop()
        await server.stop()


async def client(args: argparse.Namespace) -> dict:
    import agentlightning as agl
    from agentlightning.emitter.reward import emit_reward
    from agentlightning.types import EnqueueRolloutRequest, Span

    store = agl.LightningStoreClient(args.store_url)
    await store.enqueue_many_rollouts(
        [EnqueueRolloutRequest(input={"task": i}, mode="train") for i in range(args.rollouts)]
    )
    http = FastClient.for_url(args.proxy_url)  # the same lean load generator for every system
    body = json.dumps(
        {"model": "mock-model", "messages": [{"role": "user", "content": "What is 6 * 7?"}], "max_tokens": 16}
    ).encode()
    done: list[str] = []
    latencies: list[float] = []

    async def runner(w: int) -> None:
        while True:
            ar = await store.dequeue_rollout(worker_id=f"bench-{w}")
            if ar is None:
                return
            rid, aid = ar.rollout_id, ar.attempt.attempt_id
            path = f"/rollout/{rid}/attempt/{aid}/v1/chat/completions"
            for _ in range(args.calls):
                t = time.perf_counter()
                status, answer = await http.post(path, body)
                if status != 200:
                    raise RuntimeError(f"LLM call failed: {status} {answer[:300]!r}")
                latencies.append(time.perf_counter() - t)
            core = emit_reward(1.0, propagate=False)
            seq = await store.get_next_span_sequence_id(rid, aid)
            await store.add_span(Span.from_core_fields(core, rollout_id=rid, attempt_id=aid, sequence_id=seq))
            await store.update_attempt(rid, aid, status="succeeded")
            done.append(rid)

    t0 = time.perf_counter()
    await asyncio.gather(*(runner(w) for w in range(args.runners)))
    t_finished = time.perf_counter() - t0
    want = args.calls + 1
    pending = list(done)
    deadline = time.monotonic() + args.span_wait_s
    while pending and time.monotonic() < deadline:
        counts = await asyncio.gather(*(store.query_spans(rid, attempt_id="latest") for rid in pending))
        pending = [rid for rid, spans in zip(pending, counts) if len(spans) < want]
        if pending:
            await asyncio.sleep(0.05)
    t_spans = time.perf_counter() - t0
    missing = len(pending)
    await http.close()
    await store.close()
    latencies.sort()
    return {
        "system": "agentlightning",
        "rollouts": len(done),
        "finished_s": t_finished,
        "with_spans_s": t_spans,
        "rollouts_missing_spans": missing,
        "rate": len(done) / t_spans,
        "rate_finished": len(done) / t_finished,
        "call_p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
    }


async def start_rollout(args: argparse.Namespace) -> None:
    """Print `<rollout_id> <attempt_id>` of a fresh running attempt (for bench_gateway_overhead.py)."""
    import agentlightning as agl

    store = agl.LightningStoreClient(args.store_url)
    ar = await store.start_rollout(input={"task": "latency"})
    print(ar.rollout_id, ar.attempt.attempt_id, flush=True)
    await store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("--mock-url", default="http://127.0.0.1:8999/v1")
    ap.add_argument("--store-port", type=int, default=0)
    ap.add_argument("--proxy-port", type=int, default=0)
    ap.add_argument("--store-url", default="http://127.0.0.1:4747")
    ap.add_argument("--proxy-url", default="http://127.0.0.1:4748")
    ap.add_argument("--rollouts", type=int, default=100)
    ap.add_argument("--runners", type=int, default=100)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--span-wait-s", type=float, default=120.0)
    ap.add_argument("--start-rollout", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    for name in ("agentlightning", "LiteLLM", "litellm", "httpx", "uvicorn"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.serve:
        if not args.store_port or not args.proxy_port:
            sys.exit("--serve needs --store-port and --proxy-port")
        asyncio.run(serve(args))
    elif args.start_rollout:
        asyncio.run(start_rollout(args))
    else:
        print(json.dumps(asyncio.run(client(args))), flush=True)


if __name__ == "__main__":
    main()
