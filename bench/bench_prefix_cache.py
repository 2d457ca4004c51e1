"""Agent-shaped load with and without prefix KV caching on the real SmolLM2-135M-Instruct.

16 requests share a ~400-token prefix (system prompt with tool definitions and few-shot
examples) and differ in a ~30-token question; 24 new tokens each (greedy), 8 in flight at a
time. Both modes run in this one process on the same weights, interleaved (uncached, cached,
...) so machine load drifts hit both, and the median run of each is compared; each cached run
starts from an empty cache, so its first request pays the full prefix. Run: `.venv/bin/python bench/bench_prefix_cache.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time

import torch

from agentkiln.engine.base import ChatRequest, ChatResult
from agentkiln.engine.embedded import TransformersEngine
from agentkiln.engine.model_files import smollm2_dir
from agentkiln.engine.embedded.prefix_cache import PrefixCache

log = logging.getLogger("bench_prefix_cache")

TOOLS = [
    ("get_weather", "Current weather for a city", "city: string, unit: 'c' or 'f'"),
    ("search_flights", "Flights between two airports on a date", "origin: IATA code, destination: IATA code, date"),
    ("book_hotel", "Reserve a hotel room", "city: string, check_in: date, nights: integer, guests: integer"),
    ("convert_currency", "Convert an amount between currencies", "amount: number, from: ISO code, to: ISO code"),
    ("calculator", "Evaluate an arithmetic expression exactly", "expression: string"),
    ("lookup_order", "Status of a customer order", "order_id: string"),
]
EXAMPLES = [
    ("What is 17 * 23?", 'calculator({"expression": "17 * 23"}) -> 391. The answer is 391.'),
    ("Is it raining in Oslo?", 'get_weather({"city": "Oslo", "unit": "c"}) -> light rain, 6 C. Yes, light rain.'),
    ("Where is order A-1042?", 'lookup_order({"order_id": "A-1042"}) -> shipped. It shipped yesterday.'),
    ("How much is 250 USD in EUR?", 'convert_currency({"amount": 250, "from": "USD", "to": "EUR"}) -> 231.5.'),
]
TOPICS = ["Paris", "Tokyo", "Lima", "Cairo", "Oslo", "Denver", "Seoul", "Nairobi"]


def system_prompt() -> str:
    lines = ["You are a travel and shopping assistant. Think step by step, call at most one tool, then answer."]
    lines.append("Available tools:")
    lines += [f"- {name}: {desc}. Arguments: {args}." for name, desc, args in TOOLS]
    lines.append("Rules: never invent tool results; ask for missing arguments; answer in one short paragraph.")
    lines.append("Prefer metric units and local currency unless the user says otherwise.")
    lines.append("Examples:")
    lines += [f"User: {q}\nAssistant: {a}" for q, a in EXAMPLES]
    return "\n".join(lines)


def make_requests(count: int, new_tokens: int) -> list[ChatRequest]:
    system = system_prompt()
    reqs = []
    for i in range(count):
        city, other = TOPICS[i % len(TOPICS)], TOPICS[(i + 3) % len(TOPICS)]
        question = (
            f"Request {i}: I am planning a {i + 2}-day trip from {other} to {city} next month; what should I pack?"
        )
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        reqs.append(ChatRequest(messages=messages, temperature=0.0, max_tokens=new_tokens))
    return reqs


async def run_load(
    engine: TransformersEngine, reqs: list[ChatRequest], concurrency: int
) -> tuple[list[ChatResult], float]:
    gate = asyncio.Semaphore(concurrency)

    async def one(req: ChatRequest) -> ChatResult:
        async with gate:
            return await engine.chat(req)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(r) for r in reqs))
    return list(results), time.perf_counter() - t0


async def timed(
    engine: TransformersEngine, reqs: list[ChatRequest], concurrency: int, cache: PrefixCache | None
) -> tuple[list[ChatResult], float, int, int]:
    """One load run in a mode; returns results, seconds, prefill tokens and prefix-hit tokens."""
    if cache is not None:
        cache = PrefixCache(cache.max_tokens, cache.max_entries)  # start cold
    await engine.set_prefix_cache(cache)
    before_prefill, before_hit = engine.stats.prefill_tokens, engine.stats.prefix_hit_tokens
    results, seconds = await run_load(engine, reqs, concurrency)
    return results, seconds, engine.stats.prefill_tokens - before_prefill, engine.stats.prefix_hit_tokens - before_hit


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args()
    engine = TransformersEngine(
        smollm2_dir(), dtype=args.dtype, max_batch_size=args.concurrency, num_threads=args.threads
    )
    cache = engine.prefix_cache or PrefixCache(16_384)
    reqs = make_requests(args.requests, args.new_tokens)
    prompt_lens = [len(engine.render(r).ids) for r in reqs]
    prefix = min(
        next((i for i, (a, b) in enumerate(zip(engine.render(reqs[0]).ids, engine.render(r).ids)) if a != b), 0)
        for r in reqs[1:]
    )
    # Warm-up both modes (first passes over new shapes are slow).
    await timed(engine, reqs[: args.concurrency], args.concurrency, None)
    await timed(engine, reqs[: args.concurrency], args.concurrency, cache)

    rates: dict[str, list[float]] = {"no cache": [], "cache": []}
    outputs: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for mode, c in (("no cache", None), ("cache", cache)):
            results, seconds, prefilled, hit = await timed(engine, reqs, args.concurrency, c)
            tokens = sum(len(r.choices[0].response_ids) for r in results)
            rates[mode].append(tokens / seconds)
            outputs[mode] = [r.choices[0].response_ids for r in results]
            print(
                f"{mode:>8}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tok/s "
                f"(prompt tokens prefilled {prefilled}, reused from cache {hit})"
            )
    await engine.close()
    same = sum(a == b for a, b in zip(outputs["no cache"], outputs["cache"]))
    mid = {m: statistics.median(v) for m, v in rates.items()}
    print(
        f"threads={torch.get_num_threads()} dtype={args.dtype} requests={args.requests} "
        f"concurrency={args.concurrency} new_tokens<={args.new_tokens} shared prefix={prefix} tokens "
        f"prompts={min(prompt_lens)}-{max(prompt_lens)} tokens"
    )
    print(f"median tok/s over {args.repeats} runs each: no cache {mid['no cache']:.1f}, cache {mid['cache']:.1f}")
    print(f"ratio cache / no cache: {mid['cache'] / mid['no cache']:.2f}x")
    print(f"identical greedy outputs: {same}/{len(reqs)} ({args.dtype})")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main())
