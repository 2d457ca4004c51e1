"""Latency of a well-formed chat completion alone vs while attackers hit the same gateway.

The real app (InMemoryStore + the tiny random-init engine) on a loopback port. One client sends
a small greedy chat completion (8 tokens) one at a time, first alone, then while two attacker
processes send, back to back:
- huge stop lists (by default 100 stop strings of 4,000 characters, 400 KB, streamed so the
  visible-text filter runs too), and
- huge prompts (by default 1,000,000 characters of text),
each from its own process (forked), so the attackers' own client work does not count as ours.
Prints p50 / p95 / max of the good request in both phases and the ratio (under attack / alone),
and how the attackers were answered. Each phase is bounded in time, so even a gateway that
stalls finishes the run in about two minutes.

Run: HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_gateway_attacker.py [--requests 30] [--phase-s 40]
(`PYTHONPATH=<older checkout>` runs the same bench against older code.)
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import multiprocessing
import statistics
import time
from typing import Any

import httpx

GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 8,
        "temperature": 0}  # fmt: skip


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def good_phase(url: str, requests: int, phase_s: float) -> list[float]:
    """Latencies of up to `requests` good calls, stopping after `phase_s` (a stalled call counts as phase_s)."""
    out: list[float] = []
    give_up = time.monotonic() + phase_s
    with httpx.Client(timeout=phase_s) as http:
        while len(out) < requests and time.monotonic() < give_up:
            t0 = time.perf_counter()
            try:
                resp = http.post(url, json=GOOD, timeout=max(1.0, give_up - time.monotonic()))
                assert resp.status_code == 200, resp.text
            except httpx.TimeoutException:
                out.append(phase_s)
                break
            out.append(time.perf_counter() - t0)
    return out


def attack(url: str, body: bytes, stop: Any, answers: Any) -> None:
    """An attacker process: send `body` back to back until `stop` is set; count the answers."""
    counts: collections.Counter[str] = collections.Counter()
    with httpx.Client(timeout=60) as http:
        while not stop.is_set():
            try:
                resp = http.post(url, content=body, headers={"content-type": "application/json"})
                counts[str(resp.status_code)] += 1
            except httpx.HTTPError as exc:
                counts[type(exc).__name__] += 1
    answers.put(dict(counts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=30, help="good requests per phase")
    ap.add_argument("--phase-s", type=float, default=40.0, help="time limit of each phase")
    ap.add_argument("--stop-strings", type=int, default=100)
    ap.add_argument("--stop-chars", type=int, default=4_000)
    ap.add_argument("--prompt-chars", type=int, default=1_000_000)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)

    from agentkiln.engine.embedded import TransformersEngine
    from agentkiln.engine.model_files import tiny_model_dir
    from agentkiln.server.app import create_app
    from agentkiln.server.serve import ServerThread
    from agentkiln.store.memory import InMemoryStore

    engine = TransformersEngine(tiny_model_dir(), model_name="tiny", dtype="float32", num_threads=1)
    app = create_app(InMemoryStore(sweep_interval_s=None), sweep_interval_s=0, engine=engine, model_sync_interval_s=0)
    server = ServerThread(app)
    url = f"{server.start()}/v1/chat/completions"
    stop_body = dict(GOOD, max_tokens=64, stream=True, temperature=1.0)
    stop_body["stop"] = [f"{i:04d}" + "x" * (args.stop_chars - 4) for i in range(args.stop_strings)]
    prompt_body = dict(GOOD, messages=[{"role": "user", "content": "word " * (args.prompt_chars // 5)}])
    try:
        good_phase(url, 3, args.phase_s)  # warm-up
        alone = good_phase(url, args.requests, args.phase_s)
        ctx = multiprocessing.get_context("fork")  # attackers in their own processes: their client work is not ours
        stop, queues = ctx.Event(), [ctx.Queue(), ctx.Queue()]
        attackers = [
            ctx.Process(target=attack, args=(url, json.dumps(b).encode(), stop, q), daemon=True)
            for b, q in zip((stop_body, prompt_body), queues)
        ]
        for a in attackers:
            a.start()
        time.sleep(0.5)  # the attack is under way
        attacked = good_phase(url, args.requests, args.phase_s)
        stop.set()
        answers = [q.get(timeout=90) for q in queues]
    finally:
        server.stop()
    rows = [("alone", alone), ("under attack", attacked)]
    print(f"{'phase':<14}{'n':>4}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}")
    for name, xs in rows:
        print(f"{name:<14}{len(xs):>4}{_pct(xs, 0.5) * 1e3:>10.1f}{_pct(xs, 0.95) * 1e3:>10.1f}{max(xs) * 1e3:>10.1f}")
    print(f"ratio (under attack / alone): p50 {_pct(attacked, 0.5) / _pct(alone, 0.5):.2f}x, "
          f"p95 {_pct(attacked, 0.95) / _pct(alone, 0.95):.2f}x, mean "
          f"{statistics.mean(attacked) / statistics.mean(alone):.2f}x")  # fmt: skip
    if len(attacked) < args.requests:
        print(
            f"only {len(attacked)} of {args.requests} good requests finished within {args.phase_s:.0f} s under attack"
        )
    names = (f"stop lists ({args.stop_strings} x {args.stop_chars} chars)", f"prompts ({args.prompt_chars} chars)")
    for name, got in zip(names, answers):
        print(f"attacker {name}: answers {got}")


if __name__ == "__main__":
    main()
