"""GRPO update throughput: the agentkiln learner (GRPO objective) vs TRL GRPOTrainer, SmolLM2-135M, LoRA r16, CPU.

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

Contenders: the learner as configured by default (tree-packed micro-batch: the group's prompt
runs once, no padding), the learner with every row run in full (share_prompt=False: packed
without padding, but each row's prompt is computed again: the tokens TRL computes, less its
padding), TRL with bf16 autocast and TRL in fp32. Like-for-like = same batch, same precision
(ours bf16 autocast vs TRL bf16). "tok/s" counts prompt + completion tokens of every row for
all of them, whatever each actually computes. The contenders run interleaved, one step each per round, so load from other
processes on the machine hits them alike; the first round is warm-up; medians are reported.
--compare-git REV also times the learner as committed at a git revision (before/after).

Run: HF_HUB_OFFLINE=1 python bench/bench_grpo.py [--steps 3] [--ours-fp32] [--compare-git HEAD]
"""

from __future__ import annotations

import argparse
import importlib
import logging
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

from agentkiln.algorithms.grpo import GRPOConfig, LoraSettings
from agentkiln.engine.model_files import load_tokenizer, smollm2_dir
from agentkiln.models import Transition
from agentkiln.training.learner import Learner as GRPOLearner

log = logging.getLogger("bench_grpo")
SHARED = "agentkiln default (packed; bf16 where fast)"
PER_ROW = "agentkiln default, every row in full"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_batch(tok, k: int, min_len: int, max_len: int, seed: int) -> tuple[list[int], list[list[int]], list[float]]:
    rng = random.Random(seed)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 7? Answer with a number."}],
        add_generation_prompt=True,
        tokenize=True,
    )
    if hasattr(prompt, "keys"):
        prompt = prompt["input_ids"]
    completions = [[rng.randrange(100, 40000) for _ in range(rng.randint(min_len, max_len))] for _ in range(k)]
    advantages = [1.0 if i % 2 == 0 else -1.0 for i in range(k)]
    return list(prompt), completions, advantages


def learner_at(rev: str) -> SimpleNamespace:
    """GRPOLearner / GRPOConfig / LoraSettings as committed at git revision `rev`.

    The whole `agentkiln` tree of `rev` is unpacked as a package of another name (its absolute
    imports rewritten), so the learner runs with its own helpers (head, packing) of that time:
    the old layout (agentkiln/algorithms/grpo.py, e.g. a4b85397) and the current one
    (agentkiln/training/learner.py + algorithms/grpo/config.py) both work.
    """
    root = Path(__file__).resolve().parent.parent
    name = "kiln_at_" + re.sub(r"\W", "_", rev)
    tmp = Path(tempfile.mkdtemp())
    archive = subprocess.run(["git", "archive", rev, "agentkiln"], cwd=root, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    pkg = tmp / "agentkiln"
    for f in pkg.rglob("*.py"):
        f.write_text(re.sub(r"\bagentkiln\b(?=[. \"'])", name, f.read_text()))
    pkg.rename(tmp / name)
    sys.path.insert(0, str(tmp))
    if (tmp / name / "training" / "learner.py").exists():
        learner = importlib.import_module(f"{name}.training.learner")
        config = importlib.import_module(f"{name}.algorithms.grpo.config")
        return SimpleNamespace(
            GRPOLearner=learner.Learner, GRPOConfig=config.GRPOConfig, LoraSettings=config.LoraSettings
        )
    return importlib.import_module(f"{name}.algorithms.grpo")


def ours_step(
    model_dir, prompt, completions, advantages, bf16: bool, share: bool = True, module=None
) -> Callable[[], None]:
    """Build a GRPOLearner (of `module`, default the current one); return a function doing one update."""
    torch.manual_seed(0)
    learner_cls, config_cls, lora_cls = (
        (module.GRPOLearner, module.GRPOConfig, module.LoraSettings)
        if module
        else (GRPOLearner, GRPOConfig, LoraSettings)
    )
    learner = learner_cls(
        model_dir,
        config_cls(
            lr=1e-5,
            share_prompt=share,
            micro_batch_size=len(completions),
            bf16=bf16,
            lora=lora_cls(r=16, alpha=32, target_modules=TARGETS),
        ),
    )
    ts = [
        Transition(
            rollout_id=f"r{i}",
            attempt_id="a",
            step=0,
            prompt_ids=prompt,
            response_ids=c,
            logprobs=[-5.0] * len(c),
            advantage=a,
        )
        for i, (c, a) in enumerate(zip(completions, advantages))
    ]
    return lambda: learner.update(ts)


def trl_step(model_dir, tok, prompt, completions, advantages, bf16: bool) -> Callable[[], None]:
    """Build a TRL GRPOTrainer with generation bypassed; return a function doing one update."""
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

    def step() -> None:
        trainer.training_step(model, inputs, inputs["num_items_in_batch"])
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--min-len", type=int, default=12)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--trl", choices=("both", "bf16", "fp32", "none"), default="both", help="TRL precision(s) to time")
    ap.add_argument("--ours-fp32", action="store_true", help="also time the learner without autocast")
    ap.add_argument("--compare-git", metavar="REV", help="also time the learner as of this git revision")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--skip-old-bf16", action="store_true", help="with --compare-git: time the old learner in fp32 only")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    warnings.filterwarnings("ignore")

    if a.threads:
        torch.set_num_threads(a.threads)
    model_dir = smollm2_dir()
    tok = load_tokenizer(model_dir)
    prompt, completions, advantages = make_batch(tok, a.k, a.min_len, a.max_len, seed=0)
    tokens = sum(len(prompt) + len(c) for c in completions)
    resp = sum(len(c) for c in completions)
    print(
        f"batch: {a.k} completions, prompt {len(prompt)} tokens, completions {resp} tokens, {tokens} tokens in all; torch threads {torch.get_num_threads()}"
    )

    batch = (model_dir, prompt, completions, advantages)
    contenders: list[tuple[str, Callable[[], None]]] = [
        (SHARED, ours_step(*batch, True, share=True)),
        (PER_ROW, ours_step(*batch, True, share=False)),
    ]
    if a.ours_fp32:
        contenders.append(("agentkiln fp32 shared-prompt", ours_step(*batch, False)))
    if a.compare_git:
        old = learner_at(a.compare_git)
        before = f"agentkiln@{a.compare_git}"
        if not a.skip_old_bf16:  # on CPUs without bf16 units the old learner's bf16 is emulated (~60x slower)
            contenders.append((f"{before} bf16 shared", ours_step(*batch, True, share=True, module=old)))
            contenders.append((f"{before} bf16 per-row", ours_step(*batch, True, share=False, module=old)))
        contenders.append((f"{before} fp32 shared", ours_step(*batch, False, share=True, module=old)))
    for precision in ("bf16", "fp32"):
        if a.trl in ("both", precision):
            contenders.append(
                (f"TRL {precision}", trl_step(model_dir, tok, prompt, completions, advantages, precision == "bf16"))
            )
    # Interleave the contenders step by step so load from other processes hits all alike;
    # round 0 is warm-up.
    times: dict[str, list[float]] = {name: [] for name, _ in contenders}
    for r in range(a.steps + 1):
        for name, step in contenders:
            t0 = time.perf_counter()
            step()
            if r:
                times[name].append(time.perf_counter() - t0)
    medians = {}
    for name, ts in times.items():
        med = medians[name] = statistics.median(ts)
        print(
            f"{name:32s} step {med:6.2f} s (median of {len(ts)}: {', '.join(f'{t:.2f}' for t in ts)})  {tokens / med:7.1f} tok/s  {resp / med:6.1f} response tok/s"
        )
    for name in [n for n in medians if n.startswith("agentkiln@")]:
        print(f"RATIO grpo_update {SHARED} / {name}: {medians[name] / medians[SHARED]:.2f}x")
    # Ratios of tokens/s (= inverse ratio of step times), each of ours over each TRL precision.
    # Like-for-like = same batch and same precision (bf16 autocast on both sides).
    for trl in [n for n in medians if n.startswith("TRL")]:
        for name in (SHARED, PER_ROW):
            tag = " (like-for-like)" if trl == "TRL bf16" else ""
            tag += " (no prompt sharing)" if name == PER_ROW else ""
            print(f"RATIO grpo_update {name} / {trl}{tag}: {medians[trl] / medians[name]:.2f}x")


if __name__ == "__main__":
    main()
