"""`kiln train-offline --backend trl` vs `--backend kiln` (our learner): GRPO and SFT on the same
recorded transitions, SmolLM2-135M, LoRA r16, bf16 where fast, CPU.

Unlike bench_grpo.py (one update, TRL's generation bypassed by hand), this times the backends as
users run them: `train_with_trl` (dataset preparation, trainer construction, TRL's training loop,
saving the adapter) against `Learner.update` + `save` on the same transitions. Batches: G groups of
8 calls to one prompt each (12-64 random response tokens, returns 0/1 alternating), 1 epoch; SFT on
the rewarded half. tokens/s counts prompt + response tokens of every call trained on; the two sides
alternate rounds so load from other processes hits both; medians over rounds after a warm-up.

Run: HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_trl_backend.py [--groups 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentkiln.algorithms.grpo.config import GRPOConfig  # noqa: E402
from agentkiln.algorithms.sft.config import SFTConfig  # noqa: E402
from agentkiln.backends.trl import TRLBackendConfig, train_with_trl  # noqa: E402
from agentkiln.engine.model_files import load_tokenizer, smollm2_dir  # noqa: E402
from agentkiln.models import Transition  # noqa: E402
from agentkiln.training.learner import Learner  # noqa: E402


def batch(tok, groups: int, seed: int) -> list[Transition]:
    from agentkiln.adapter.credit import group_advantages

    rng = random.Random(seed)
    calls = []
    for g in range(groups):
        prompt = list(tok.apply_chat_template([{"role": "user", "content": f"What is {g} + 7? Answer with a number."}],
                                              add_generation_prompt=True, tokenize=True)["input_ids"])  # fmt: skip
        for i in range(8):
            response = [rng.randrange(100, 40000) for _ in range(rng.randint(12, 64))]
            calls.append(Transition(rollout_id=f"r{g}-{i}", attempt_id="a", step=0, prompt_ids=prompt,
                                    response_ids=response, logprobs=[-5.0] * len(response), group_id=f"g{g}",
                                    **{"return": float(i % 2)}))  # fmt: skip
    adv = group_advantages({c.rollout_id: c.return_ for c in calls}, {c.rollout_id: c.group_id for c in calls})
    for c in calls:
        c.advantage = adv[c.rollout_id]
    return calls


def tokens(calls: list[Transition]) -> int:
    return sum(len(c.prompt_ids) + len(c.response_ids) for c in calls)


def ours(model_dir: str, calls: list[Transition], algorithm: str, out: Path) -> None:
    config = GRPOConfig(lr=1e-5, micro_batch_size=8) if algorithm == "grpo" else SFTConfig(lr=1e-5, batch_size=8)
    learner = Learner(model_dir, replace(config, epochs=1))
    learner.update(calls)
    learner.save(out / "adapter")


def trl(model_dir: str, calls: list[Transition], algorithm: str, out: Path) -> None:
    train_with_trl(calls, model_dir, out, TRLBackendConfig(algorithm=algorithm, lr=1e-5, batch_size=8))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model_dir = str(smollm2_dir())
    tok = load_tokenizer(model_dir)
    calls = batch(tok, args.groups, seed=0)
    sets = {"grpo": calls, "sft": [c for c in calls if c.return_ == 1.0]}
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds + 1):
        for algorithm, data in sets.items():
            for name, fn in (("kiln", ours), ("trl", trl)):
                with tempfile.TemporaryDirectory() as out:
                    t0 = time.perf_counter()
                    fn(model_dir, data, algorithm, Path(out))
                    elapsed = time.perf_counter() - t0
                if r:  # round 0 warms caches (model files, kernels)
                    times.setdefault((algorithm, name), []).append(elapsed)
                print(f"round {r} {algorithm} {name}: {elapsed:.1f} s", flush=True)
    print("\n| algorithm | backend | calls | tokens | median s (load + train + save) | tokens/s |")
    print("|---|---|---|---|---|---|")
    for (algorithm, name), ts in times.items():
        med = statistics.median(ts)
        n = tokens(sets[algorithm])
        print(f"| {algorithm} | {name} | {len(sets[algorithm])} | {n} | {med:.2f} | {n / med:.0f} |")
    for algorithm in sets:
        ratio = statistics.median(times[(algorithm, "trl")]) / statistics.median(times[(algorithm, "kiln")])
        print(f"RATIO {algorithm} tokens/s kiln / trl: {ratio:.2f}x")


if __name__ == "__main__":
    main()
