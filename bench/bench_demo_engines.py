"""`kiln demo` served by the embedded engine vs by vLLM, back to back in one session.

Runs `kiln demo --engine <spec>` once per engine (same tasks, seed, budget and learner; only
the server that samples differs) and reads each run's result.json / history.jsonl:
validation accuracy before and after (best), the first step whose validation reaches the
target and the training seconds at that step, and sampling throughput (response tokens
generated / sampling seconds, summed over steps). Ratios are vLLM / embedded.

On a 2-core CPU box vLLM and the learner share the cores, as the embedded engine and the
learner do; vLLM's start-up (server + warm-up request) is outside the training time.

Run: HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_demo_engines.py [--engines smollm2,vllm] [--time-budget 540]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_demo(engine: str, run_dir: Path, extra: list[str]) -> float:
    """One `kiln demo`; returns its wall seconds (start-up included)."""
    kiln = Path(sys.executable).with_name("kiln")
    cmd = [str(kiln), "demo", "--engine", engine, "--run-dir", str(run_dir), *extra]
    print("$", " ".join(cmd), flush=True)
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.monotonic() - t0


def summarize(run_dir: Path, target: float) -> dict:
    result = json.loads((run_dir / "result.json").read_text())
    history = result["history"]
    reached = next((h for h in history if h.get("val_reward") is not None and h["val_reward"] >= target), None)
    tokens = sum(h.get("sample_tokens", 0) for h in history)
    sample_s = sum(h.get("sample_s", 0.0) for h in history)
    return {
        "val_before": result["val_before"],
        "val_after": result["val_after"],
        "validations": [(h["step"], h["val_reward"]) for h in history if h.get("val_reward") is not None],
        "steps": len(history),
        "training_s": result["elapsed_s"],
        "total_s": result["total_s"],
        "target_step": reached["step"] if reached else None,
        "target_s": reached["elapsed_s"] if reached else None,
        "sample_tokens": tokens,
        "sample_s": sample_s,
        "sample_tokens_per_s": tokens / sample_s if sample_s else 0.0,
        "sample_s_per_step": sample_s / len(history) if history else 0.0,
    }


def _fmt(value, spec: str = ".3f") -> str:
    return "not reached" if value is None else format(value, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default="smollm2,vllm", help="comma-separated engine specs, the first is the baseline")
    ap.add_argument("--time-budget", type=float, default=540.0)
    ap.add_argument("--target", type=float, default=0.8, help="validation accuracy whose first step is timed")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-demo-engines")
    args = ap.parse_args()

    rows = {}
    for engine in args.engines.split(","):
        run_dir = args.out / engine.replace(":", "_").replace("/", "_")
        wall = run_demo(engine, run_dir, ["--time-budget", str(args.time_budget)])
        rows[engine] = {**summarize(run_dir, args.target), "wall_s": wall}
        print(json.dumps({engine: rows[engine]}), flush=True)

    base_name = next(iter(rows))
    base = rows[base_name]
    print(f"\n| engine | val before | val after (best) | validations | steps | first >= {args.target} | "
          "training s | sampling tok/s | sampling s/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        first = "not reached" if r["target_step"] is None else f"step {r['target_step']} ({r['target_s']:.0f} s)"
        vals = ", ".join(f"{v:.3f}@{s}" for s, v in r["validations"])
        print(f"| {name} | {_fmt(r['val_before'])} | {_fmt(r['val_after'])} | {vals} | {r['steps']} | {first} | "
              f"{r['training_s']:.0f} | {r['sample_tokens_per_s']:.1f} | {r['sample_s_per_step']:.1f} |")
    for name, r in rows.items():
        if name == base_name:
            continue
        ratio = r["sample_tokens_per_s"] / base["sample_tokens_per_s"] if base["sample_tokens_per_s"] else float("nan")
        print(f"\nsampling tokens/s {name} / {base_name}: {ratio:.2f}x")
        if r["target_s"] is not None and base["target_s"] is not None:
            print(f"time to {args.target} {name} / {base_name}: {r['target_s'] / base['target_s']:.2f}x")


if __name__ == "__main__":
    main()
