"""Latency production capture adds to a plain /v1 call: capture on vs off, same run, SQLite.

Two `kiln serve` processes (UpstreamEngine on the instant mock backend, default SQLite store):
one with capture off, one with `--capture` (and the default redaction patterns email, api_key).
Targets, taking turns in short batches so background load hits all alike:
- direct: the mock itself;
- off: plain /v1 on the capture-off server (served, nothing recorded);
- on: plain /v1 on the capture-on server with an X-Kiln-Session header, a new session every
  5 calls (each session's first call also opens its rollout: one store write more);
- attempt: the per-attempt URL on the capture-off server (what training rollouts pay), for reference.
"added" = percentile through the server minus the same percentile direct.

Run: .venv/bin/python bench/bench_capture_overhead.py [--requests 1000]
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
from bench_gateway_overhead import _pct, _start_ours
from bench_store_throughput import _stop, _wait_http
from mock_openai import FastClient, free_port, start_mock

BATCH = 50
CALLS_PER_SESSION = 5


def serve(store_url: str, port: int, mock_url: str, capture: bool) -> None:
    from agentkiln.production.capture import CaptureConfig
    from agentkiln.server.serve import serve_async

    config = CaptureConfig(enabled=capture, redact=("email", "api_key") if capture else ())
    asyncio.run(serve_async(store_url, port=port, engine_spec=f"upstream:{mock_url}#mock-model",
                            log_level="warning", capture=config))  # fmt: skip


async def measure(targets: dict[str, tuple[str, str, bool]], requests: int, stream: bool) -> dict[str, list[float]]:
    body = json.dumps(
        {"model": "mock-model", "messages": [{"role": "user", "content": "What is 6 * 7?"}], "max_tokens": 16,
         **({"stream": True} if stream else {})}
    ).encode()  # fmt: skip
    clients = {name: FastClient.for_url(base) for name, (base, _, _) in targets.items()}
    lat: dict[str, list[float]] = {name: [] for name in targets}
    calls = {name: 0 for name in targets}

    def headers(name: str) -> dict[str, str] | None:
        if not targets[name][2]:
            return None
        calls[name] += 1
        return {"X-Kiln-Session": f"bench-{'s' if stream else 'n'}-{calls[name] // CALLS_PER_SESSION}"}

    for name, (_, path, _) in targets.items():
        for _ in range(20):
            await clients[name].post(path, body, headers(name))
    for rnd in range(max(1, requests // BATCH)):
        names = list(targets)
        names = names[rnd % len(names) :] + names[: rnd % len(names)]
        for name in names:
            path = targets[name][1]
            for _ in range(BATCH):
                h = headers(name)
                t = time.perf_counter()
                status, data = await clients[name].post(path, body, h)
                lat[name].append(time.perf_counter() - t)
                if status != 200 or (stream and b"[DONE]" not in data):
                    raise RuntimeError(f"{name}: bad answer {status} {data[:300]!r}")
    for c in clients.values():
        await c.close()
    return lat


def _start(store_url: str, mock_url: str, capture: bool, procs: list) -> str:
    port = free_port()
    cmd = [sys.executable, __file__, "--serve", store_url, "--port", str(port), "--mock-url", mock_url]
    if capture:
        cmd.append("--capture")
    procs.append(subprocess.Popen(cmd, start_new_session=True, env=os.environ.copy()))
    base = f"http://127.0.0.1:{port}"
    _wait_http(base + "/health")
    return base


async def _count_sessions(base: str) -> int:
    from agentkiln.models import RolloutMode
    from agentkiln.store.client import HttpStore

    async with HttpStore(base) as store:
        return len(await store.query_rollouts(mode=RolloutMode.production, limit=10_000))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000, help="per target and mode")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mock-url", help=argparse.SUPPRESS)
    ap.add_argument("--capture", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.mock_url, args.capture)
        return
    mock, mock_url = start_mock()
    procs = [mock]
    tmp = tempfile.mkdtemp(prefix="kiln-bench-")
    try:
        off = _start(os.path.join(tmp, "off.db"), mock_url, False, procs)
        on = _start(os.path.join(tmp, "on.db"), mock_url, True, procs)
        targets = {
            "direct": (mock_url.rsplit("/v1", 1)[0], "/v1/chat/completions", False),
            "off": (off, "/v1/chat/completions", False),
            "on": (on, "/v1/chat/completions", True),
            "attempt": (off, asyncio.run(_start_ours(off)), False),
        }
        for stream in (False, True):
            lat = asyncio.run(measure(targets, args.requests, stream))
            mode = "streaming" if stream else "non-streaming"
            d50, d99 = _pct(lat["direct"], 0.5), _pct(lat["direct"], 0.99)
            print(f"\n{mode}, {len(lat['direct'])} sequential requests per target; direct p50 {1000 * d50:.3f} ms")
            added = {}
            for name in ("off", "on", "attempt"):
                added[name] = (_pct(lat[name], 0.5) - d50, _pct(lat[name], 0.99) - d99)
                print(f"  {name:8s} added p50 {1000 * added[name][0]:7.3f} ms   added p99 {1000 * added[name][1]:7.3f} ms")
            print(f"RATIO capture_overhead {mode} on / off: p50 {added['on'][0] / max(added['off'][0], 1e-6):.2f}x  "
                  f"p99 {added['on'][1] / max(added['off'][1], 1e-6):.2f}x; on / attempt-recorded: "
                  f"p50 {added['on'][0] / max(added['attempt'][0], 1e-6):.2f}x")  # fmt: skip
        print(f"sessions recorded by the capture-on server: {asyncio.run(_count_sessions(on))}")
    finally:
        for p in reversed(procs):
            _stop(p)


if __name__ == "__main__":
    main()
