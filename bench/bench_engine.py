"""Throughput of the embedded engine (8 concurrent requests, continuous batching) vs sequential HF generate.

Both sides use the real SmolLM2-135M-Instruct in the same dtype, greedy decoding and a fixed
number of new tokens (stop tokens ignored by capping with max_tokens and counting what was
generated), so the ratio isolates batching. Run: `.venv/bin/python bench/bench_engine.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

import torch

from agentkiln.engine.base import ChatRequest
from agentkiln.engine.embedded import TransformersEngine
from agentkiln.engine.model_files import smollm2_dir

log = logging.getLogger("bench_engine")

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how photosynthesis works.",
    "Describe the city of Paris to a tourist.",
    "List some tips for learning to play the guitar.",
    "What are the benefits of regular exercise?",
    "Explain the rules of chess to a beginner.",
    "Write a poem about autumn leaves.",
    "How does a computer store information?",
]


async def engine_run(engine: TransformersEngine, reqs: list[ChatRequest]) -> tuple[int, float]:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(engine.chat(r) for r in reqs))
    elapsed = time.perf_counter() - t0
    return sum(len(r.choices[0].response_ids) for r in results), elapsed


def hf_sequential(engine: TransformersEngine, reqs: list[ChatRequest], new_tokens: int) -> tuple[int, float]:
    model = engine._model
    tokens = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for req in reqs:
            ids = torch.tensor([engine.render(req).ids])
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=engine._pad_id)
            tokens += out.shape[1] - ids.shape[1]
    return tokens, time.perf_counter() - t0


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    engine = TransformersEngine(smollm2_dir(), dtype=args.dtype, max_batch_size=args.concurrency)
    prompts = (PROMPTS * ((args.concurrency + len(PROMPTS) - 1) // len(PROMPTS)))[: args.concurrency]
    reqs = [
        ChatRequest(messages=[{"role": "user", "content": p}], temperature=0.0, max_tokens=args.new_tokens)
        for p in prompts
    ]
    # Warm-up at full length: the first pass over new sequence lengths is several times slower (kernel setup).
    await engine_run(engine, reqs)
    hf_sequential(engine, reqs[:1], args.new_tokens)
    e_tok, e_s = await engine_run(engine, reqs)
    h_tok, h_s = hf_sequential(engine, reqs, args.new_tokens)
    await engine.close()
    e_rate, h_rate = e_tok / e_s, h_tok / h_s
    print(
        f"threads={torch.get_num_threads()} dtype={args.dtype} concurrency={args.concurrency} new_tokens<={args.new_tokens}"
    )
    print(f"engine (batched, {args.concurrency} concurrent): {e_tok} tokens in {e_s:.2f} s = {e_rate:.1f} tok/s")
    print(f"HF generate (one at a time):        {h_tok} tokens in {h_s:.2f} s = {h_rate:.1f} tok/s")
    print(f"ratio engine / sequential: {e_rate / h_rate:.2f}x  (stats: {engine.stats})")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main())
