"""The causal-LM learner: one model (LoRA or full), its optimizer, token log-probs, checkpoints.

GRPO and SFT both train through this class; what differs is the objective (see `losses`)
handed to `update`. Why it looks the way it does:

* old logprobs are the engine's sampling-time logprobs recorded in the spans, so there is no
  extra "old policy" forward pass; clipping also absorbs the small engine/trainer mismatch.
* log-probs are computed only for the sampled response tokens: the decoder runs once, the
  hidden states of the positions that predict response tokens are gathered, and only those go
  through the 49k-vocab output layer (in fp32, since a bf16 logit is off by ~0.1 nats), then
  ``logit[token] - logsumexp(logits)``, sliced over the vocabulary (see `head`). The output
  layer is a large share of a 135M model's cost.
* with LoRA the KL reference is the base model with the adapter switched off (no second copy).
* a micro-batch is tree-packed (see `packing`): one packed row, each distinct prefix once (a
  group's prompt runs once), no padding; attention follows the prefix tree. The padded layouts
  remain as the fallback for models whose attention cannot be switched.
* with reduced precision + LoRA the frozen decoder Linear weights are stored in it: autocast
  would cast them on every forward anyway (it caches casts only of trainable weights), so the
  numbers are the same without the copies.
* the device comes from the config (`device`): batches are built on the CPU and moved once.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from agentkiln.engine.limits import GREEDY_BELOW_TEMPERATURE
from agentkiln.hardware import bf16_is_fast
from agentkiln.models import Transition
from agentkiln.training import packing
from agentkiln.training.config import LearnerConfig
from agentkiln.training.device import amp_dtype, autocast, resolve_device
from agentkiln.training.head import chosen_logprobs, per_temperature
from agentkiln.training.packing import LAYOUT_KWARG, Batch, Item

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.pt"
POLICY_DIR = "policy"
INFO_FILE = "kiln_training.json"

LossFn = Callable[[torch.Tensor, Batch, "torch.Tensor | None"], torch.Tensor]


def _frozen_linears_to(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store the frozen Linear weights of the decoder layers in `dtype` (used only under autocast)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for module in decoder.modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad:
            module.to(dtype)


def _head_logprobs(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    with autocast(hidden.device, enabled=False):
        logits = head(hidden.float()).float()
    if temperature != 1.0:
        # Same distribution the engine sampled from (and recorded logprobs under).
        logits = logits / temperature
    picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    return picked - torch.logsumexp(logits, dim=-1)


def _logprob_temperature(sampled: float | None) -> float | None:
    """The temperature the engine recorded a call's log-probs under (greedy calls: log_softmax at 1).

    top_p is not applied here: the engine records each token's log-prob before nucleus truncation
    (engine/embedded/sampler.py), and the learner takes the same quantity, so the ratio starts at 1.
    """
    if sampled is None:
        return None
    return 1.0 if sampled < GREEDY_BELOW_TEMPERATURE else float(sampled)


class Learner:
    """Holds the policy (peft LoRA or full), the optimizer and an optional KL reference.

    config: a `LearnerConfig` subclass (GRPOConfig, SFTConfig); its `objective()` is the loss
    `update` runs unless another is given.
    """

    def __init__(self, model_dir: str | Path, config: LearnerConfig, loss: Any = None) -> None:
        from agentkiln.engine.model_files import load_model

        self.model_dir = Path(model_dir)
        self.config = cfg = config
        self.loss = loss if loss is not None else cfg.objective()
        self.device = resolve_device(cfg.device)
        low = amp_dtype(self.device)
        # Reduced precision only where it is fast: emulated bf16 is ~60x slower than fp32 (agentkiln.hardware).
        self.amp = cfg.bf16 and (low != torch.bfloat16 or bf16_is_fast(self.device.type))
        base = load_model(self.model_dir, "float32").to(self.device)
        self.pad_id = int(base.config.pad_token_id if base.config.pad_token_id is not None else 0)
        self.ref_model: torch.nn.Module | None = None
        if cfg.lora is not None:
            from peft import get_peft_model

            self.model = get_peft_model(base, cfg.lora.peft_config())
            if self.amp:
                _frozen_linears_to(base, low)
                for m in self.model.modules():  # autocast casts inputs; peft's cast would add copies
                    if hasattr(m, "cast_input_dtype_enabled"):
                        m.cast_input_dtype_enabled = False
        else:
            self.model = base
            if self.loss.needs_reference:
                self.ref_model = load_model(self.model_dir, "float32").to(self.device)
                self.ref_model.requires_grad_(False)
                if self.amp:
                    _frozen_linears_to(self.ref_model, low)
        self.model.train()
        models = (base, self.ref_model)
        self._tree = cfg.pack and all(packing.enable_tree_attention(m) for m in models if m is not None)
        if cfg.pack and not self._tree:
            log.info("tree packing unavailable for this model; using padded micro-batches")
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        # fused: one kernel for all LoRA tensors (4x less optimizer time than the per-tensor loop)
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        self.step = 0
        self.tokens_seen = 0
        n_train = sum(p.numel() for p in self.trainable)
        log.info(
            "learner on %s (%s, %s): %s trainable parameters (%s)",
            self.model_dir,
            type(self.loss).__name__,
            self.device,
            n_train,
            "LoRA" if cfg.lora else "full",
        )

    # ------------------------------------------------------------------ log-probs

    def _causal_lm(self, model: torch.nn.Module) -> torch.nn.Module:
        """The transformers CausalLM inside (peft wraps it; LoRA layers are injected in place)."""
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _collate(self, items: Sequence[Item]) -> Batch:
        return packing.collate(items, self.pad_id, self.config.share_prompt, self._tree).to(self.device)

    def _token_logprobs(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Log-probs [N] of the response tokens; logits only for the positions that predict them."""
        causal = self._causal_lm(model)
        decoder = causal.base_model  # the decoder stack (LlamaModel), without the output layer
        head = causal.get_output_embeddings()
        if batch.layout is not None and not self._tree:  # packed by a caller, model cannot run it
            batch = packing.collate(batch.items, self.pad_id, self.config.share_prompt, pack=False)
        batch = batch.to(self.device)
        with autocast(self.device, enabled=self.amp):
            if batch.layout is not None:
                lay = batch.layout
                hidden = decoder(
                    input_ids=lay.input_ids,
                    position_ids=lay.position_ids,
                    attention_mask=lay.mask,  # 4D: transformers passes it through untouched
                    use_cache=False,
                    **{LAYOUT_KWARG: lay},
                ).last_hidden_state
            elif batch.prefix_ids is None:
                hidden = decoder(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
                ).last_hidden_state
            else:
                hidden = self._shared_prefix_hidden(decoder, batch)
        picked = hidden[batch.rows, batch.positions]
        t = self.loss.temperature
        temps = batch.temperatures if getattr(self.loss, "per_call_temperature", False) else None
        if temps is None:
            return self._output_logprobs(head, picked, batch.targets, t)
        # Each call under the temperature it was sampled with; calls that recorded none: the config's.
        temps = torch.nan_to_num(temps.to(picked.device), nan=t)
        return per_temperature(lambda h, y, tt: self._output_logprobs(head, h, y, tt), picked, batch.targets, temps)

    def _output_logprobs(
        self, head: torch.nn.Module, picked: torch.Tensor, targets: torch.Tensor, t: float
    ) -> torch.Tensor:
        if isinstance(head, torch.nn.Linear) and head.bias is None:
            with autocast(self.device, enabled=False):
                return chosen_logprobs(picked, head.weight, targets, t, max_kept=self.config.logits_chunk)
        n, chunk = picked.shape[0], max(1, self.config.logits_chunk)
        if n <= chunk:
            return _head_logprobs(head, picked, targets, t)
        parts = [
            checkpoint(_head_logprobs, head, picked[i : i + chunk], targets[i : i + chunk], t, use_reentrant=False)
            for i in range(0, n, chunk)
        ]
        return torch.cat(parts)

    @staticmethod
    def _shared_prefix_hidden(decoder: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """[B, 1 + W, H]: prompt run once (batch 1), its KV cache repeated for the response rows.

        Gradients flow through the shared cache into the prompt's computation, so this is the
        same loss as running every row in full, with the prompt's cost paid once per group.
        Rows are right-padded, so causal attention keeps padding out of real tokens' outputs.
        """
        rows = batch.input_ids.shape[0]
        out = decoder(input_ids=batch.prefix_ids, use_cache=True)
        last = out.last_hidden_state[:, -1:]
        if batch.input_ids.shape[1] == 0:
            return last.expand(rows, 1, last.shape[-1])
        # transformers 5.24 renamed past_key_values to cache; accept both spellings.
        cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
        cache.batch_repeat_interleave(rows)
        kw = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
        suffix = decoder(input_ids=batch.input_ids, use_cache=True, **{kw: cache}).last_hidden_state
        return torch.cat([last.expand(rows, 1, last.shape[-1]), suffix], dim=1)

    @contextlib.contextmanager
    def _reference(self) -> Iterator[torch.nn.Module]:
        if self.ref_model is not None:
            yield self.ref_model
        elif self.config.lora is not None:
            with self.model.disable_adapter():
                yield self.model
        else:
            raise RuntimeError("no reference model: full fine-tune without a KL term")

    @torch.no_grad()
    def logprobs(self, transitions: Sequence[Transition], *, reference: bool = False) -> list[list[float]]:
        """Current (or reference) policy log-prob of every response token of each transition."""
        items = [self._item(t) for t in transitions]
        out: list[list[float]] = [[] for _ in items]
        was_training = self.model.training
        self.model.eval()
        try:
            for idx in self._micro_batches(items):
                batch = self._collate([items[i] for i in idx])
                if reference:
                    with self._reference() as ref:
                        lp = self._token_logprobs(ref, batch)
                else:
                    lp = self._token_logprobs(self.model, batch)
                for i, part in zip(idx, lp.split(batch.lengths)):
                    out[i] = part.tolist()
        finally:
            self.model.train(was_training)
        return out

    # ------------------------------------------------------------------ update

    @staticmethod
    def _item(t: Transition) -> Item:
        if not t.prompt_ids or not t.response_ids:
            raise ValueError(f"transition {t.rollout_id}/{t.step} has an empty prompt or response")
        if len(t.logprobs) != len(t.response_ids):
            raise ValueError(
                f"transition {t.rollout_id}/{t.step}: {len(t.logprobs)} logprobs for {len(t.response_ids)} tokens"
            )
        mask = t.response_mask if t.response_mask else [1] * len(t.response_ids)
        if len(mask) != len(t.response_ids):
            raise ValueError(f"transition {t.rollout_id}/{t.step}: mask length differs from the response")
        return Item(
            ids=list(t.prompt_ids) + list(t.response_ids),
            prompt_len=len(t.prompt_ids),
            old_logprobs=[float(x) for x in t.logprobs],
            mask=[float(m) for m in mask],
            advantage=float(t.advantage),
            temperature=_logprob_temperature(t.temperature),
        )

    def _micro_batches(self, items: Sequence[Item]) -> list[list[int]]:
        """Indices in micro-batches of micro_batch_size sequences.

        With share_prompt, transitions with the same prompt (a GRPO group) are batched together
        so the prompt runs once per micro-batch; the rest are sorted by length (less padding).
        """
        size = max(1, self.config.micro_batch_size)

        def by_len(i: int) -> int:
            return len(items[i].ids)

        rest = list(range(len(items)))
        out: list[list[int]] = []
        if self.config.share_prompt:
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, it in enumerate(items):
                groups.setdefault(tuple(it.ids[: it.prompt_len]), []).append(i)
            rest = []
            for idx in groups.values():
                if len(idx) == 1:
                    rest.extend(idx)
                    continue
                idx.sort(key=by_len)
                out.extend(idx[i : i + size] for i in range(0, len(idx), size))
        rest.sort(key=by_len)
        out.extend(rest[i : i + size] for i in range(0, len(rest), size))
        return out

    def _optimizer_step(self, max_grad_norm: float) -> tuple[bool, float]:
        """Clip, then step unless the gradient is non-finite (a bad batch must not poison the weights)."""
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, max_grad_norm))
        if not math.isfinite(grad_norm):
            log.warning("non-finite gradient norm; optimizer step skipped")
            self.optimizer.zero_grad(set_to_none=True)
            return False, grad_norm
        self.optimizer.step()
        self.step += 1
        return True, grad_norm

    def step_on(
        self, batches: Sequence[Batch], loss_fn: LossFn, refs: Sequence[torch.Tensor | None] | None = None
    ) -> tuple[bool, float, int]:
        """One optimizer step accumulated over micro-batches; returns (stepped, grad norm, tokens forwarded).

        loss_fn(log-probs, batch, reference log-probs or None) gives the micro-batch's loss.
        """
        self.optimizer.zero_grad(set_to_none=True)
        forwarded = 0
        for batch, ref_lp in zip(batches, refs if refs is not None else [None] * len(batches)):
            loss_fn(self._token_logprobs(self.model, batch), batch, ref_lp).backward()
            forwarded += batch.tokens
        stepped, grad_norm = self._optimizer_step(self.config.max_grad_norm)
        return stepped, grad_norm, forwarded

    def update(self, transitions: Sequence[Transition], loss: Any = None) -> dict[str, float]:
        """One update on a batch with `loss` (default: the config's objective); returns metrics."""
        t0 = time.perf_counter()
        return (loss or self.loss).run(self, [self._item(t) for t in transitions], t0)

    def update_pairs(self, pairs: Sequence[tuple[Transition, Transition]], loss: Any = None) -> dict[str, float]:
        """One update on (chosen, rejected) preference pairs with a pairwise objective (DPOObjective).

        The pairs travel as one flat list, chosen at even positions, which the objective reads back.
        """
        flat = [t for pair in pairs for t in pair]
        if len(flat) != 2 * len(pairs):
            raise ValueError("each preference pair is exactly (chosen, rejected)")
        return self.update(flat, loss)

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> Path:
        """Weights the engine can serve: a peft adapter folder (LoRA) or a full model folder."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(path))
        if self.config.lora is None:
            from agentkiln.engine.model_files import load_tokenizer

            load_tokenizer(self.model_dir).save_pretrained(str(path))
        info = {"base_model": str(self.model_dir), "step": self.step, "lora": self.config.lora is not None}
        (path / INFO_FILE).write_text(json.dumps(info, indent=2))
        return path

    def checkpoint(self, path: str | Path) -> Path:
        """Policy + optimizer + step, written to a temp folder then renamed (a crash leaves the old one)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            self.save(tmp / POLICY_DIR)
            state = {
                "optimizer": self.optimizer.state_dict(),
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "config": self.config.to_dict(),
                "rng": torch.get_rng_state(),
            }
            torch.save(state, tmp / TRAINER_STATE)
            if path.exists():
                old = path.with_name(path.name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                os.rename(path, old)
                os.rename(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return path

    def load_adapter(self, folder: str | Path) -> None:
        """Start from a served LoRA adapter (e.g. the deployed version) instead of a fresh one;
        it must have this learner's LoRA layout (same r, alpha, target modules)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        if self.config.lora is None:
            raise ValueError("load_adapter needs a LoRA learner (this one trains all weights)")
        result = set_peft_model_state_dict(self.model, load_file(str(Path(folder) / "adapter_model.safetensors")))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"adapter {folder} does not match the LoRA layout: {result.unexpected_keys[:5]}")

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore policy weights, optimizer state and step written by `checkpoint`."""
        from safetensors.torch import load_file

        path = Path(path)
        policy = path / POLICY_DIR
        if self.config.lora is not None:
            self.load_adapter(policy)
        else:
            weights: dict[str, torch.Tensor] = {}
            for f in sorted(policy.glob("*.safetensors")):
                weights.update(load_file(str(f)))
            missing, unexpected = self.model.load_state_dict(weights, strict=False)
            tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
            if unexpected or set(missing) - tied:
                raise ValueError(
                    f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
        state = torch.load(path / TRAINER_STATE, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        if "rng" in state:
            torch.set_rng_state(state["rng"])
        log.info("resumed learner from %s at step %d", path, self.step)
