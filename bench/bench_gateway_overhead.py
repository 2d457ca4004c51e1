"""Latency a recording gateway adds per chat completion: AgentKiln gateway vs agentlightning 0.3.0 LLMProxy.

Both proxies sit in front of the same instant mock backend (bench/mock_openai.py) and record
every call as a span of a running attempt (per-attempt URL /rollout/{rid}/attempt/{aid}/v1):
- ours: `kiln serve` (UpstreamEngine on the mock), default SQLite store, and the in-memory store;
- agentlightning: LightningStoreServer + LLMProxy (LiteLLM), as bench/agl_store_throughput.py
  --serve starts them (.venv-agl).
One client sends requests one at a time (so latency is not queueing) with a lean keep-alive
HTTP client, streaming and not, to the mock directly and through each proxy. Targets take
turns in short batches so background load hits all alike. "added" = percentile through the
proxy minus the same percentile direct.

Run: .venv/bin/python bench/bench_gateway_overhead.py [--requests 1000] [--skip-agl]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_store_throughput import AGL_PY, _stop, _wait_http, _wait_ready
from mock_openai import FastClient, free_port, start_mock

BATCH = 50


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def _start_ours(url: str) -> str:
    from agentkiln.store.client import HttpStore

    store = HttpStore(url)
    ar = await store.start_rollout({"task": "latency"})
    await store.close()
    return f"/rollout/{ar.rollout.rollout_id}/attempt/{ar.attempt.attempt_id}/v1/chat/completions"


async def measure(targets: dict[str, tuple[str, str]], requests: int, stream: bool) -> dict[str, list[float]]:
    body = json.dumps(
        {"model": "mock-model", "messages": [{"role": "user", "content": "What is 6 * 7?"}], "max_tokens": 16,
         **({"stream": True} if stream else {})}
    ).encode()  # fmt: skip
    clients = {name: FastClient.for_url(base) for name, (base, _) in targets.items()}
    lat: dict[str, list[float]] = {name: [] for name in targets}
    for name, (_, path) in targets.items():  # warm-up: connections, first-call imports
        for _ in range(20):
            await clients[name].post(path, body)
    rounds = max(1, requests // BATCH)
    for rnd in range(rounds):
        names = list(targets)
        names = names[rnd % len(names) :] + names[: rnd % len(names)]
        for name in names:
            path = targets[name][1]
            c = clients[name]
            for _ in range(BATCH):
                t = time.perf_counter()
                status, data = await c.post(path, body)
                lat[name].append(time.perf_counter() - t)
                if status != 200 or (stream and b"[DONE]" not in data):
                    raise RuntimeError(f"{name}: bad answer {status} {data[:300]!r}")
    for c in clients.values():
        await c.close()
    return lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000, help="per target and mode")
    ap.add_argument("--skip-agl", action="store_true")
    args = ap.parse_args()
    use_agl = not args.skip_agl and AGL_PY.exists()
    mock, mock_url = start_mock()
    procs = [mock]
    tmp = tempfile.mkdtemp(prefix="kiln-bench-")
    try:
        targets: dict[str, tuple[str, str]] = {"direct": (mock_url.rsplit("/v1", 1)[0], "/v1/chat/completions")}
        for name, store_url in (("ours-sqlite", os.path.join(tmp, "gw.db")), ("ours-memory", "memory")):
            port = free_port()
            cmd = [sys.executable, str(HERE / "bench_store_throughput.py"), "--serve", store_url, "--port", str(port),
                   "--mock-url", mock_url]  # fmt: skip
            procs.append(subprocess.Popen(cmd, start_new_session=True))
            base = f"http://127.0.0.1:{port}"
            _wait_http(base + "/health")
            targets[name] = (base, asyncio.run(_start_ours(base)))
        if use_agl:
            sport, pport = free_port(), free_port()
            cmd = [str(AGL_PY), str(HERE / "agl_store_throughput.py"), "--serve", "--mock-url", mock_url,
                   "--store-port", str(sport), "--proxy-port", str(pport)]  # fmt: skip
            p = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True
            )
            procs.append(p)
            _, store_url, proxy_url = _wait_ready(p, "agentlightning server").split()
            out = subprocess.run(
                [str(AGL_PY), str(HERE / "agl_store_throughput.py"), "--start-rollout", "--store-url", store_url],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            rid, aid = out.stdout.split()[-2:]
            targets["agentlightning"] = (proxy_url, f"/rollout/{rid}/attempt/{aid}/v1/chat/completions")
        else:
            print("agentlightning skipped (.venv-agl missing or --skip-agl)")
        for stream in (False, True):
            lat = asyncio.run(measure(targets, args.requests, stream))
            mode = "streaming" if stream else "non-streaming"
            d50, d99 = _pct(lat["direct"], 0.5), _pct(lat["direct"], 0.99)
            print(f"\n{mode}, {len(lat['direct'])} sequential requests per target; direct p50 {1000 * d50:.3f} ms "
                  f"p99 {1000 * d99:.3f} ms")  # fmt: skip
            added = {}
            for name, xs in lat.items():
                if name == "direct":
                    continue
                a50, a99 = _pct(xs, 0.5) - d50, _pct(xs, 0.99) - d99
                added[name] = (a50, a99)
                print(f"  {name:15s} added p50 {1000 * a50:8.3f} ms   added p99 {1000 * a99:8.3f} ms")
            if "agentlightning" in added:
                for name in ("ours-sqlite", "ours-memory"):
                    r50 = added["agentlightning"][0] / max(added[name][0], 1e-6)
                    r99 = added["agentlightning"][1] / max(added[name][1], 1e-6)
                    print(f"RATIO gateway_overhead {mode} agentlightning / {name}: p50 {r50:.1f}x  p99 {r99:.1f}x")
    finally:
        for p in reversed(procs):
            _stop(p)


if __name__ == "__main__":
    main()
