"""Real runs of APO and SFT on the demo calculator agent with the local SmolLM2 engine (CPU).

APO optimizes the agent's system prompt (prompts["system"]) with SmolLM2 itself as the
optimizer LLM (through the kiln gateway's /v1); SFT imitates the agent's successful
sampled runs (LoRA). Both print validation accuracy before/after on the same greedy val tasks.

`apo-vs-gepa` runs APO, counts the rollouts it used (train + validation, from its store), then
GEPA (the `gepa` library) with that many rollouts as its budget, the same optimizer LLM settings,
tasks and validation set: the two prompt optimizers side by side in one run.

Run: HF_HUB_OFFLINE=1 python bench/bench_apo_sft.py apo [--rounds 2 --beam 2 --val 8]
     HF_HUB_OFFLINE=1 python bench/bench_apo_sft.py sft [--rounds 2 --val 12]
     HF_HUB_OFFLINE=1 python bench/bench_apo_sft.py apo-vs-gepa [--rounds 2 --val 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from pathlib import Path

from agentkiln.algorithms.apo import APO, OptimizerLLM
from agentkiln.algorithms.gepa import GEPA, GEPAConfig
from agentkiln.algorithms.sft import SFT, SFTConfig
from agentkiln.demo.agent import SYSTEM_PROMPT, calculator_agent
from agentkiln.demo.tasks import make_tasks
from agentkiln.store import open_store
from agentkiln.trainer import Trainer

OPTIMIZER = dict(temperature=0.7, max_tokens=120, timeout_s=900)


async def count_rollouts(db: Path) -> int:
    store = open_store(str(db))
    try:
        n, page = 0, 1000
        while batch := await store.query_rollouts(limit=page, offset=n):
            n += len(batch)
        return n
    finally:
        await store.close()


def apo_vs_gepa(args, train, val) -> None:  # noqa: ANN001
    """APO, then GEPA with APO's rollout count as its budget; one summary line each, then the table."""
    root = Path(args.run_dir or "runs/bench-apo-vs-gepa")
    rows = []
    budget = None
    for name in ("apo", "gepa"):
        run_dir = root / name
        run_dir.mkdir(parents=True, exist_ok=True)
        db = run_dir / "kiln.db"
        db.unlink(missing_ok=True)
        if name == "apo":
            algorithm = APO(initial_prompt=SYSTEM_PROMPT, rounds=args.rounds or 2, beam_width=args.beam,
                            branch_factor=2, train_batch_size=4, optimizer=OptimizerLLM(**OPTIMIZER))  # fmt: skip
        else:
            algorithm = GEPA(initial_prompt=SYSTEM_PROMPT, optimizer=OptimizerLLM(**OPTIMIZER),
                             config=GEPAConfig(max_metric_calls=budget, reflection_minibatch_size=4))  # fmt: skip
        started = time.monotonic()
        trainer = Trainer(algorithm, n_runners=8, engine="smollm2", store=str(db), run_dir=run_dir)
        result = trainer.fit(calculator_agent, train, val)
        used = asyncio.run(count_rollouts(db))
        budget = budget or used
        row = {"algorithm": name, "val_before": result.val_before, "val_after": result.val_after, "rollouts": used,
               "total_s": round(time.monotonic() - started, 1), "best_prompt": result.extra.get("best_prompt")}
        print(json.dumps(row, default=str), flush=True)
        rows.append(row)
    print("\n| optimizer | rollouts (budget) | validation before | after (best prompt) | total s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['algorithm']} | {r['rollouts']} | {r['val_before']:.3f} | {r['val_after']:.3f} | {r['total_s']} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("algorithm", choices=["apo", "sft", "apo-vs-gepa"])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--beam", type=int, default=2)
    parser.add_argument("--val", type=int, default=None)
    parser.add_argument("--train", type=int, default=100)
    parser.add_argument("--run-dir", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    train = make_tasks(args.train, seed=1, prefix="train")
    if args.algorithm == "apo-vs-gepa":
        apo_vs_gepa(args, train, make_tasks(args.val or 16, seed=2, prefix="val"))
        return
    if args.algorithm == "apo":
        val = make_tasks(args.val or 8, seed=2, prefix="val")
        algorithm = APO(
            initial_prompt=SYSTEM_PROMPT,
            rounds=args.rounds or 2,
            beam_width=args.beam,
            branch_factor=2,
            train_batch_size=4,
            optimizer=OptimizerLLM(**OPTIMIZER),
        )
    else:
        val = make_tasks(args.val or 12, seed=2, prefix="val")
        algorithm = SFT(
            rounds=args.rounds or 2,
            tasks_per_round=8,
            samples_per_task=4,
            temperature=0.7,
            min_reward=1.0,
            config=SFTConfig(lr=2e-4, epochs=2, batch_size=16),
        )
    started = time.monotonic()
    trainer = Trainer(algorithm, n_runners=8, engine="smollm2", run_dir=args.run_dir or f"runs/bench-{args.algorithm}")
    result = trainer.fit(calculator_agent, train, val)
    summary = {
        "algorithm": args.algorithm,
        "val_tasks": len(val),
        "val_before": result.val_before,
        "val_after": result.val_after,
        "total_s": round(time.monotonic() - started, 1),
        **({"best_prompt": result.extra.get("best_prompt")} if args.algorithm == "apo" else {}),
        "history": result.history
        if args.algorithm == "sft"
        else [{k: h.get(k) for k in ("round", "train", "beam", "best_score")} for h in result.history],
    }
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
