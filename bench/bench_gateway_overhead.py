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

`--compare-git REV` adds the same two servers as committed at git revision REV (unpacked to a
temporary folder and run with it first on PYTHONPATH), so before/after come from one run.

Run: .venv/bin/python bench/bench_gateway_overhead.py [--requests 1000] [--skip-agl] [--compare-git REV]
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


def tree_at(rev: str) -> Path:
    """The repository as committed at `rev`, unpacked into a temporary folder."""
    root = HERE.parent
    tmp = Path(tempfile.mkdtemp(prefix="kiln-rev-"))
    archive = subprocess.run(["git", "archive", rev], cwd=root, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    return tmp


def _start_server(tree: Path, store_url: str, mock_url: str, procs: list) -> str:
    port = free_port()
    cmd = [sys.executable, str(tree / "bench" / "bench_store_throughput.py"), "--serve", store_url, "--port", str(port),
           "--mock-url", mock_url]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))}
    procs.append(subprocess.Popen(cmd, start_new_session=True, env=env, cwd=tree))
    base = f"http://127.0.0.1:{port}"
    _wait_http(base + "/health")
    return base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000, help="per target and mode")
    ap.add_argument("--skip-agl", action="store_true")
    ap.add_argument("--compare-git", metavar="REV", help="also run the servers as committed at this revision")
    args = ap.parse_args()
    use_agl = not args.skip_agl and AGL_PY.exists()
    mock, mock_url = start_mock()
    procs = [mock]
    tmp = tempfile.mkdtemp(prefix="kiln-bench-")
    try:
        targets: dict[str, tuple[str, str]] = {"direct": (mock_url.rsplit("/v1", 1)[0], "/v1/chat/completions")}
        trees = [("ours", HERE.parent)]
        if args.compare_git:
            trees.append((f"at-{args.compare_git[:10]}", tree_at(args.compare_git)))
        for label, tree in trees:
            for kind, store_url in (("sqlite", os.path.join(tmp, f"{label}.db")), ("memory", "memory")):
                base = _start_server(tree, store_url, mock_url, procs)
                targets[f"{label}-{kind}"] = (base, asyncio.run(_start_ours(base)))
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
                print(f"  {name:22s} added p50 {1000 * a50:8.3f} ms   added p99 {1000 * a99:8.3f} ms")
            if args.compare_git:
                for kind in ("sqlite", "memory"):
                    old, new = added[f"at-{args.compare_git[:10]}-{kind}"], added[f"ours-{kind}"]
                    print(f"RATIO gateway_overhead {mode} {kind} after / before: p50 {new[0] / max(old[0], 1e-6):.2f}x  "
                          f"p99 {new[1] / max(old[1], 1e-6):.2f}x")  # fmt: skip
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
