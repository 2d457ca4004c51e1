"""GRPO update throughput: agentkiln GRPOLearner vs TRL GRPOTrainer, SmolLM2-135M, LoRA r16, CPU.

Both sides get the same batch: one chat prompt and 8 fixed completions (12-64 tokens, random
token ids; content does not change the cost) with advantages +-1. Only the update is timed:
forward, backward, grad clipping and the AdamW step.

How TRL is timed without its generation: GRPOTrainer.training_step calls
`self._prepare_inputs(batch)`, which normally generates and scores completions. We replace
`_prepare_inputs` on the trainer instance by the identity and hand `training_step` the dict
`_generate_and_score_completions` would have produced (prompt_ids/mask left-padded,
completion_ids/mask right-padded, advantages, num_items_in_batch). With num_iterations=1
TRL takes old logprobs = detached current ones (no extra pass), like our recorded-logprob
path. The optimizer step (trainer.create_optimizer(), AdamW, lr 1e-5) and clipping are done
by hand after training_step, as Trainer's loop would.

Run: HF_HUB_OFFLINE=1 python bench/bench_grpo.py [--steps 3] [--trl-bf16]
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import time
import warnings

import torch

from agentkiln.algorithms.grpo import GRPOConfig, GRPOLearner, LoraSettings
from agentkiln.engine.model_files import load_tokenizer, smollm2_dir
from agentkiln.models import Transition

log = logging.getLogger("bench_grpo")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_batch(tok, k: int, min_len: int, max_len: int, seed: int) -> tuple[list[int], list[list[int]], list[float]]:
    rng = random.Random(seed)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 7? Answer with a number."}], add_generation_prompt=True, tokenize=True)
    if hasattr(prompt, "keys"):
        prompt = prompt["input_ids"]
    completions = [[rng.randrange(100, 40000) for _ in range(rng.randint(min_len, max_len))] for _ in range(k)]
    advantages = [1.0 if i % 2 == 0 else -1.0 for i in range(k)]
    return list(prompt), completions, advantages


def time_ours(model_dir, prompt, completions, advantages, steps: int, bf16: bool) -> list[float]:
    torch.manual_seed(0)
    learner = GRPOLearner(model_dir, GRPOConfig(lr=1e-5, micro_batch_size=len(completions), bf16=bf16, lora=LoraSettings(r=16, alpha=32, target_modules=TARGETS)))
    ts = [
        Transition(rollout_id=f"r{i}", attempt_id="a", step=0, prompt_ids=prompt, response_ids=c, logprobs=[-5.0] * len(c), advantage=a)
        for i, (c, a) in enumerate(zip(completions, advantages))
    ]
    times = []
    for i in range(steps + 1):  # first step is warm-up
        t0 = time.perf_counter()
        learner.update(ts)
        if i:
            times.append(time.perf_counter() - t0)
    return times


def time_trl(model_dir, tok, prompt, completions, advantages, steps: int, bf16: bool) -> list[float]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    torch.manual_seed(0)
    k = len(completions)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    args = TRLConfig(
        output_dir="/tmp/bench_grpo_trl",
        per_device_train_batch_size=k,
        num_generations=k,
        max_completion_length=max(len(c) for c in completions),
        learning_rate=1e-5,
        max_grad_norm=1.0,
        use_cpu=True,
        bf16=bf16,
        report_to="none",
        logging_steps=1000,
        save_strategy="no",
    )
    ds = Dataset.from_list([{"prompt": "What is 12 + 7?"}] * k)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=ds,
        processing_class=tok,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=list(TARGETS), task_type="CAUSAL_LM"),
    )
    trainer._prepare_inputs = lambda batch: batch  # skip generation: we pass a prepared batch
    trainer.current_gradient_accumulation_steps = 1  # normally set by Trainer's training loop
    trainer.create_optimizer()
    width = max(len(c) for c in completions)
    comp = torch.full((k, width), tok.pad_token_id, dtype=torch.long)
    cmask = torch.zeros((k, width), dtype=torch.long)
    for i, c in enumerate(completions):
        comp[i, : len(c)] = torch.tensor(c)
        cmask[i, : len(c)] = 1
    inputs = {
        "prompt_ids": torch.tensor([prompt] * k),
        "prompt_mask": torch.ones((k, len(prompt)), dtype=torch.long),
        "completion_ids": comp,
        "completion_mask": cmask,
        "advantages": torch.tensor(advantages),
        "num_items_in_batch": cmask.sum(),
    }
    model = trainer.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        trainer.training_step(model, inputs, inputs["num_items_in_batch"])
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--min-len", type=int, default=12)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--trl-bf16", action="store_true", help="let TRL autocast to bf16 too (default fp32, as measured in MODEL-NOTES)")
    ap.add_argument("--skip-trl", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    warnings.filterwarnings("ignore")

    model_dir = smollm2_dir()
    tok = load_tokenizer(model_dir)
    prompt, completions, advantages = make_batch(tok, a.k, a.min_len, a.max_len, seed=0)
    tokens = sum(len(prompt) + len(c) for c in completions)
    resp = sum(len(c) for c in completions)
    print(f"batch: {a.k} completions, prompt {len(prompt)} tokens, completions {resp} tokens, {tokens} tokens in all; torch threads {torch.get_num_threads()}")

    rows = []
    for name, fn in [
        ("agentkiln bf16-autocast", lambda: time_ours(model_dir, prompt, completions, advantages, a.steps, True)),
        ("agentkiln fp32", lambda: time_ours(model_dir, prompt, completions, advantages, a.steps, False)),
    ] + ([] if a.skip_trl else [(f"TRL GRPOTrainer {'bf16' if a.trl_bf16 else 'fp32'}", lambda: time_trl(model_dir, tok, prompt, completions, advantages, a.steps, a.trl_bf16))]):
        times = fn()
        med = statistics.median(times)
        rows.append((name, med))
        print(f"{name:28s} step {med:6.2f} s (median of {len(times)}: {', '.join(f'{t:.2f}' for t in times)})  {tokens / med:7.1f} tok/s  {resp / med:6.1f} response tok/s")
    if not a.skip_trl:
        trl = rows[-1][1]
        for name, med in rows[:-1]:
            print(f"speed-up of {name} over TRL: {trl / med:.2f}x")


if __name__ == "__main__":
    main()
