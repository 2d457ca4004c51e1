"""Store + runner throughput, rollouts/s: AgentKiln (SQLite and in-memory) vs agentlightning 0.3.0.

Every system runs as it is deployed, on loopback, with an instant mock OpenAI backend
(bench/mock_openai.py) behind it:
- ours: a `kiln serve` process (store API + gateway, UpstreamEngine pointed at the mock), with
  the default SQLite file store or the in-memory store; runners talk to it with HttpStore and
  make their LLM calls through the gateway's /rollout/{rid}/attempt/{aid}/v1 URL, which
  records every call as a span (token ids, logprobs) before answering.
- agentlightning: bench/agl_store_throughput.py --serve in .venv-agl: InMemoryLightningStore
  behind LightningStoreServer, plus its LiteLLM-based LLMProxy recording the calls as spans
  (see that file).
One round per system: enqueue --rollouts rollouts (untimed), then --runners concurrent runner
coroutines each loop dequeue -> --calls chat completions -> reward span -> attempt succeeded,
until the queue is empty. A round ends when all rollouts are finished with all their spans
stored. Each round's clients run in a fresh process; systems alternate round by round (order
rotated) so load from others on the machine hits all alike; medians are reported.

Run: .venv/bin/python bench/bench_store_throughput.py [--rounds 3] [--skip-agl]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from mock_openai import FastClient, free_port, start_mock

RUNNERS_PER_STORE_CLIENT = 25
AGL_PY = ROOT / ".venv-agl" / "bin" / "python"
log = logging.getLogger("bench_store_throughput")


# ----------------------------------------------------------------------------- our server and client


def serve_ours(store_url: str, port: int, mock_url: str) -> None:
    """`kiln serve` with an upstream engine on the mock (warning log level: no access log)."""
    from agentkiln.server.serve import serve_async

    if os.environ.get("KILN_BENCH_UVLOOP"):  # what `kiln serve` would gain on uvloop
        import uvloop

        uvloop.install()
    asyncio.run(serve_async(store_url, port=port, engine_spec=f"upstream:{mock_url}#mock-model", log_level="warning"))


async def client_ours(url: str, rollouts: int, runners: int, calls: int) -> dict:
    from agentkiln.models import AttemptStatus, SpanIn
    from agentkiln.protocol import SpanAttrs, SpanNames
    from agentkiln.store.client import HttpStore

    # Runners are separate processes in a deployment, each with its own client. One httpx pool
    # shared by 1,000 coroutines spends the load generator's CPU on pool bookkeeping (measured:
    # the client process at 100 % CPU, the server at 14 %), so each group of runners gets its own.
    groups = [HttpStore(url) for _ in range(-(-runners // RUNNERS_PER_STORE_CLIENT))]
    store = groups[0]
    await store.enqueue_rollouts([{"input": {"task": i}} for i in range(rollouts)])
    http = FastClient.for_url(url)  # the same lean load generator for every system
    body = json.dumps(
        {"model": "mock-model", "messages": [{"role": "user", "content": "What is 6 * 7?"}], "max_tokens": 16}
    ).encode()
    done: list[str] = []
    failed: list[str] = []  # LLM calls that failed after the client's retries
    latencies: list[float] = []

    async def runner(w: int) -> None:
        store = groups[w // RUNNERS_PER_STORE_CLIENT]
        while True:
            ar = await store.dequeue_rollout(f"bench-{w}")
            if ar is None:
                return
            rid, aid = ar.rollout.rollout_id, ar.attempt.attempt_id
            call_path = f"/rollout/{rid}/attempt/{aid}/v1/chat/completions"
            for _ in range(calls):
                t = time.perf_counter()
                try:
                    status, answer = await http.post(call_path, body)
                except (OSError, asyncio.IncompleteReadError) as exc:
                    status, answer = 0, repr(exc).encode()
                if status != 200:
                    failed.append(f"{status} {answer[:200]!r}")
                    continue
                latencies.append(time.perf_counter() - t)
            reward = {SpanAttrs.reward_value: 1.0, SpanAttrs.reward_name: "primary", SpanAttrs.reward_final: True}
            await store.add_spans([SpanIn(rollout_id=rid, attempt_id=aid, name=SpanNames.reward, attributes=reward)])
            await store.update_attempt(rid, aid, status=AttemptStatus.succeeded)
            done.append(rid)

    t0 = time.perf_counter()
    await asyncio.gather(*(runner(w) for w in range(runners)))
    elapsed = time.perf_counter() - t0
    # Spans are written before each answer goes out, so they are all there now; check (untimed).
    counts = await asyncio.gather(*(store.query_spans(rid) for rid in done))
    missing = sum(len(s) < calls + 1 for s in counts)
    await http.close()
    for group in groups:
        await group.close()
    latencies.sort()
    return {
        "rollouts": len(done),
        "finished_s": elapsed,
        "with_spans_s": elapsed,
        "rollouts_missing_spans": missing,
        "rate": len(done) / elapsed,
        "failed_calls": len(failed),
        "first_failure": failed[0] if failed else None,
        "retries_503": http.retries_503,
        "stale_retries": http.stale_retries,
        "call_p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
    }


# ----------------------------------------------------------------------------- driver


def _wait_ready(proc: subprocess.Popen, what: str, timeout: float = 180.0) -> str:
    """Read the server's stdout until its READY line (LiteLLM prints a banner first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"{what} exited before it was ready (rc={proc.poll()})")
        if line.startswith("READY"):
            return line.strip()
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s")


def _wait_http(url: str, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def _stop(proc: subprocess.Popen) -> None:
    """Stop a server started with start_new_session=True and its children (LLMProxy runs in one)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):  # SIGKILL also reaps children the parent left behind
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
    proc.wait()


def _run_client(cmd: list[str], timeout: float) -> dict:
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"client failed (rc={out.returncode}): {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rollouts", type=int, default=200, help="rollouts per round for our systems")
    ap.add_argument("--agl-rollouts", type=int, default=100, help="rollouts per round for agentlightning")
    ap.add_argument("--runners", type=int, default=100)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--skip-agl", action="store_true")
    ap.add_argument("--only", default="", help="comma list of systems: sqlite,memory,agl")
    ap.add_argument("--client", choices=["ours"], help=argparse.SUPPRESS)
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mock-url", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if args.serve:
        serve_ours(args.serve, args.port, args.mock_url)
        return
    if args.client:
        print(json.dumps(asyncio.run(client_ours(args.url, args.rollouts, args.runners, args.calls))), flush=True)
        return

    systems = [s for s in (args.only.split(",") if args.only else ["sqlite", "memory", "agl"]) if s]
    if args.skip_agl or not AGL_PY.exists():
        if "agl" in systems:
            print(f"agentlightning skipped ({AGL_PY} missing or --skip-agl)")
        systems = [s for s in systems if s != "agl"]
    mock, mock_url = start_mock()
    procs: list[subprocess.Popen] = [mock]
    tmp = tempfile.mkdtemp(prefix="kiln-bench-")
    urls: dict[str, tuple[str, ...]] = {}
    try:
        for name in systems:
            if name in ("sqlite", "memory"):
                port = free_port()
                store_url = os.path.join(tmp, "bench.db") if name == "sqlite" else "memory"
                cmd = [sys.executable, __file__, "--serve", store_url, "--port", str(port), "--mock-url", mock_url]
                procs.append(subprocess.Popen(cmd, start_new_session=True))
                urls[name] = (f"http://127.0.0.1:{port}",)
                _wait_http(urls[name][0] + "/health")
            else:
                sport, pport = free_port(), free_port()
                cmd = [str(AGL_PY), str(HERE / "agl_store_throughput.py"), "--serve", "--mock-url", mock_url,
                       "--store-port", str(sport), "--proxy-port", str(pport)]  # fmt: skip
                p = subprocess.Popen(
                    cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True
                )
                procs.append(p)
                _, store_url, proxy_url = _wait_ready(p, "agentlightning server").split()
                urls[name] = (store_url, proxy_url)
        results: dict[str, list[dict]] = {s: [] for s in systems}
        for rnd in range(args.rounds + 1):  # round 0 warms up (imports, connections, first SQLite pages)
            order = systems[rnd % len(systems) :] + systems[: rnd % len(systems)]
            for name in order:
                if name == "agl":
                    cmd = [str(AGL_PY), str(HERE / "agl_store_throughput.py"), "--store-url", urls[name][0],
                           "--proxy-url", urls[name][1], "--rollouts", str(args.agl_rollouts),
                           "--runners", str(args.runners), "--calls", str(args.calls)]  # fmt: skip
                else:
                    cmd = [sys.executable, __file__, "--client", "ours", "--url", urls[name][0],
                           "--rollouts", str(args.rollouts), "--runners", str(args.runners),
                           "--calls", str(args.calls)]  # fmt: skip
                res = _run_client(cmd, timeout=900)
                tag = "warm-up" if rnd == 0 else f"round {rnd}"
                print(f"[{tag}] {name:7s} {res['rollouts']} rollouts in {res['with_spans_s']:.2f}s = "
                      f"{res['rate']:.1f} rollouts/s (call p50 {res['call_p50_ms']:.2f} ms, "
                      f"missing spans: {res['rollouts_missing_spans']}, failed calls: {res.get('failed_calls', 0)}, "
                      f"503 retries: {res.get('retries_503', 0)})", flush=True)  # fmt: skip
                if rnd:
                    results[name].append(res)
        print(f"\n{args.runners} runners x {args.calls} LLM calls per rollout, spans recorded by each gateway/proxy")
        med = {name: statistics.median(r["rate"] for r in rs) for name, rs in results.items()}
        labels = {"sqlite": "agentkiln SQLite (kiln serve + HttpStore)", "memory": "agentkiln in-memory (kiln serve)",
                  "agl": "agentlightning 0.3.0 in-memory (LightningStoreServer + LLMProxy)"}  # fmt: skip
        for name, rate in med.items():
            print(f"  {labels[name]:66s} {rate:8.1f} rollouts/s (median of {len(results[name])})")
        if "agl" in med:
            for name in ("sqlite", "memory"):
                if name in med:
                    print(f"RATIO store_throughput {name} / agentlightning: {med[name] / med['agl']:.1f}x")
    finally:
        for p in reversed(procs):
            _stop(p)


if __name__ == "__main__":
    main()
