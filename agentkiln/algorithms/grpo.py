"""GRPO update core: clipped-ratio policy gradient on transitions, LoRA or full fine-tune, CPU.

Why it looks the way it does:

* old logprobs are the engine's sampling-time logprobs recorded in the spans, so there is no
  extra "old policy" forward pass; clipping also absorbs the small engine/trainer mismatch.
* log-probs are computed only for the sampled response tokens: the decoder runs once, the
  hidden states of the positions that predict response tokens are gathered, and only those go
  through the 49k-vocab output layer (in fp32, since a bf16 logit is off by ~0.1 nats), then
  ``logit[token] - logsumexp(logits)``, sliced over the vocabulary (see `head`). The output
  layer is a large share of a 135M model's cost.
* the loss is a token mean over the whole batch (every micro-batch divides by the batch's total
  trained-token count), so gradient accumulation gives the same step as one big batch.
* with LoRA the KL reference is the base model with the adapter switched off (no second copy).
* a micro-batch is tree-packed (see `packing`): one packed row, each distinct prefix once (a
  group's prompt runs once), no padding; attention follows the prefix tree. The padded layouts
  below remain as the fallback for models whose attention cannot be switched.
* with bf16 + LoRA the frozen decoder Linear weights are stored in bf16: autocast would cast
  them to bf16 on every forward anyway (it caches casts only of trainable weights), so the
  numbers are the same without the copies.
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
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from agentkiln.algorithms.head import chosen_logprobs
from agentkiln.algorithms.packing import LAYOUT_KWARG, TreeLayout, build_tree, enable_tree_attention
from agentkiln.models import Transition

log = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRAINER_STATE = "trainer_state.pt"
POLICY_DIR = "policy"
INFO_FILE = "kiln_training.json"


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS


@dataclass
class GRPOConfig:
    """Hyper-parameters of the update.

    lora=None trains all weights (fp32 master weights, ~4x slower per token on CPU).
    clip_eps_high: upper clip (DAPO "clip-higher"); None = clip_eps.
    kl_coef: weight of the k3 KL estimate to the reference (0 = no reference forward at all).
    epochs: optimizer steps over the same batch (one per epoch; micro-batches accumulate).
    skip_zero_advantage: with kl_coef 0 a zero-advantage transition has zero gradient, so it
        is not forwarded (its tokens still count in the token mean).
    share_prompt: run a prompt shared by several transitions (a GRPO group) once per
        micro-batch (same loss; saves the prompt's cost k-1 times): packed, any common prefix
        is one trie node; padded, the prompt's KV cache is repeated for the rows.
    logits_chunk: above this many response tokens per micro-batch, the [tokens, vocab] logits
        are not kept for the backward pass (recomputed slice by slice, bounded memory).
    temperature: the sampling temperature the rollouts used; log-probs are taken under the
        same tempered distribution so ratios start at 1 and match the recorded logprobs.
    pack: tree-pack micro-batches (no padding, shared prefixes once; see `packing`); the
        padded layouts are used when False or when the model's attention cannot be switched.
    """

    lr: float = 1e-4
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    kl_coef: float = 0.0
    micro_batch_size: int = 8
    epochs: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    lora: LoraSettings | None = field(default_factory=LoraSettings)
    bf16: bool = True
    skip_zero_advantage: bool = True
    logits_chunk: int = 2048
    share_prompt: bool = True
    temperature: float = 1.0
    pack: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["lora"] is not None:
            d["lora"]["target_modules"] = list(d["lora"]["target_modules"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GRPOConfig:
        d = dict(d)
        lora = d.pop("lora", None)
        if lora is not None:
            lora = LoraSettings(**{**lora, "target_modules": tuple(lora["target_modules"])})
        return cls(lora=lora, **d)


@dataclass
class _Item:
    """One transition prepared for batching."""

    ids: list[int]  # prompt + response
    prompt_len: int
    old_logprobs: list[float]
    mask: list[float]
    advantage: float


@dataclass
class _Batch:
    input_ids: torch.Tensor  # [B, T] (each sequence without its last token)
    attention_mask: torch.Tensor
    rows: torch.Tensor  # [N] batch row of each response token
    positions: torch.Tensor  # [N] position whose output predicts it
    targets: torch.Tensor  # [N] the response token ids
    old_logprobs: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor  # [N] (per-rollout advantage repeated per token)
    lengths: list[int]  # response length per row, to split [N] back per sequence
    tokens: int = 0  # prompt + response tokens of all rows (what "tokens/s" counts)
    prefix_ids: torch.Tensor | None = None  # [1, P] prompt shared by every row; input_ids then hold responses
    layout: TreeLayout | None = None  # tree-packed: input_ids etc. live in the layout, rows are all 0
    items: Sequence[_Item] = ()  # what it was built from (to fall back to a padded layout)


def _collate(items: Sequence[_Item], pad_id: int, share: bool = False, pack: bool = True) -> _Batch:
    """Batch tensors of a micro-batch: tree-packed (pack), else padded rows (share: the prompt once)."""
    if pack:
        layout = build_tree([it.ids for it in items], [it.prompt_len for it in items], share)
        empty = torch.empty((0, 0), dtype=torch.long)
        batch = _batch(items, empty, empty, [0] * len(layout.predictors), layout.predictors)
        batch.layout, batch.items = layout, items
        return batch
    if share and len(items) > 1 and all(it.prompt_len == items[0].prompt_len for it in items):
        p = items[0].prompt_len
        if all(it.ids[:p] == items[0].ids[:p] for it in items):
            return _collate_shared(items, pad_id)
    width = max(len(it.ids) - 1 for it in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    rows: list[int] = []
    positions: list[int] = []
    for b, it in enumerate(items):
        seq = it.ids[:-1]
        input_ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[b, : len(seq)] = 1
        n = len(it.ids) - it.prompt_len
        rows.extend([b] * n)
        positions.extend(range(it.prompt_len - 1, it.prompt_len - 1 + n))
    return _batch(items, input_ids, attention, rows, positions)


def _batch(
    items: Sequence[_Item],
    input_ids: torch.Tensor,
    attention: torch.Tensor,
    rows: list[int],
    positions: list[int],
    prefix_ids: torch.Tensor | None = None,
) -> _Batch:
    """The per-token tensors both layouts share, in item order."""
    targets: list[int] = []
    old: list[float] = []
    mask: list[float] = []
    adv: list[float] = []
    lengths: list[int] = []
    for it in items:
        n = len(it.ids) - it.prompt_len
        targets.extend(it.ids[it.prompt_len :])
        old.extend(it.old_logprobs)
        mask.extend(it.mask)
        adv.extend([it.advantage] * n)
        lengths.append(n)
    return _Batch(
        input_ids=input_ids,
        attention_mask=attention,
        rows=torch.tensor(rows, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        old_logprobs=torch.tensor(old, dtype=torch.float32),
        mask=torch.tensor(mask, dtype=torch.float32),
        advantages=torch.tensor(adv, dtype=torch.float32),
        lengths=lengths,
        tokens=sum(len(it.ids) for it in items),
        prefix_ids=prefix_ids,
    )


def _collate_shared(items: Sequence[_Item], pad_id: int) -> _Batch:
    """Rows share one prompt: it is run once and its KV cache repeated, the rows carry only responses.

    Hidden-state index j of a row predicts response token j: index 0 is the prompt's last
    position (shared), index j > 0 is the row's response token j - 1.
    """
    p = items[0].prompt_len
    width = max(len(it.ids) - p - 1 for it in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    rows: list[int] = []
    positions: list[int] = []
    for b, it in enumerate(items):
        resp = it.ids[p:]
        n = len(resp)
        input_ids[b, : n - 1] = torch.tensor(resp[:-1], dtype=torch.long)
        attention[b, : n - 1] = 1
        rows.extend([b] * n)
        positions.extend(range(n))
    return _batch(items, input_ids, attention, rows, positions, torch.tensor([items[0].ids[:p]], dtype=torch.long))


def _frozen_linears_to_bf16(model: torch.nn.Module) -> None:
    """Store the frozen Linear weights of the decoder layers in bf16 (used only under autocast)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for module in decoder.modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad:
            module.to(torch.bfloat16)


def _head_logprobs(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    with torch.autocast(device_type="cpu", enabled=False):
        logits = head(hidden.float()).float()
    if temperature != 1.0:
        # Same distribution the engine sampled from (and recorded logprobs under).
        logits = logits / temperature
    picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    return picked - torch.logsumexp(logits, dim=-1)


class GRPOLearner:
    """Holds the policy (peft LoRA or full), the optimizer and an optional KL reference."""

    def __init__(self, model_dir: str | Path, config: GRPOConfig | None = None) -> None:
        from agentkiln.engine.model_files import load_model

        self.model_dir = Path(model_dir)
        self.config = config or GRPOConfig()
        cfg = self.config
        base = load_model(self.model_dir, "float32")
        self.pad_id = int(base.config.pad_token_id if base.config.pad_token_id is not None else 0)
        self.ref_model: torch.nn.Module | None = None
        if cfg.lora is not None:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=list(cfg.lora.target_modules),
                task_type="CAUSAL_LM",
            )
            self.model = get_peft_model(base, lora)
            if cfg.bf16:
                _frozen_linears_to_bf16(base)
                for m in self.model.modules():  # autocast casts inputs; peft's cast would add copies
                    if hasattr(m, "cast_input_dtype_enabled"):
                        m.cast_input_dtype_enabled = False
        else:
            self.model = base
            if cfg.kl_coef > 0:
                self.ref_model = load_model(self.model_dir, "float32")
                self.ref_model.requires_grad_(False)
                if cfg.bf16:
                    _frozen_linears_to_bf16(self.ref_model)
        self.model.train()
        self._tree = cfg.pack and all(enable_tree_attention(m) for m in (base, self.ref_model) if m is not None)
        if cfg.pack and not self._tree:
            log.info("tree packing unavailable for this model; using padded micro-batches")
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        # fused: one kernel for all LoRA tensors (4x less optimizer time than the per-tensor loop)
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        self.step = 0
        self.tokens_seen = 0
        n_train = sum(p.numel() for p in self.trainable)
        log.info(
            "GRPO learner on %s: %s trainable parameters (%s)", self.model_dir, n_train, "LoRA" if cfg.lora else "full"
        )

    # ------------------------------------------------------------------ log-probs

    def _causal_lm(self, model: torch.nn.Module) -> torch.nn.Module:
        """The transformers CausalLM inside (peft wraps it; LoRA layers are injected in place)."""
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=self.config.bf16)

    def _collate(self, items: Sequence[_Item]) -> _Batch:
        return _collate(items, self.pad_id, self.config.share_prompt, self._tree)

    def _token_logprobs(self, model: torch.nn.Module, batch: _Batch) -> torch.Tensor:
        """Log-probs [N] of the response tokens; logits only for the positions that predict them."""
        causal = self._causal_lm(model)
        decoder = causal.base_model  # the decoder stack (LlamaModel), without the output layer
        head = causal.get_output_embeddings()
        if batch.layout is not None and not self._tree:  # packed by a caller, model cannot run it
            batch = _collate(batch.items, self.pad_id, self.config.share_prompt, pack=False)
        with self._autocast():
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
        t = self.config.temperature
        if isinstance(head, torch.nn.Linear) and head.bias is None:
            with torch.autocast(device_type="cpu", enabled=False):
                return chosen_logprobs(picked, head.weight, batch.targets, t, max_kept=self.config.logits_chunk)
        n, chunk = picked.shape[0], max(1, self.config.logits_chunk)
        if n <= chunk:
            return _head_logprobs(head, picked, batch.targets, t)
        parts = [
            checkpoint(
                _head_logprobs, head, picked[i : i + chunk], batch.targets[i : i + chunk], t, use_reentrant=False
            )
            for i in range(0, n, chunk)
        ]
        return torch.cat(parts)

    @staticmethod
    def _shared_prefix_hidden(decoder: torch.nn.Module, batch: _Batch) -> torch.Tensor:
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
            raise RuntimeError("no reference model: full fine-tune with kl_coef == 0")

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
    def _item(t: Transition) -> _Item:
        if not t.prompt_ids or not t.response_ids:
            raise ValueError(f"transition {t.rollout_id}/{t.step} has an empty prompt or response")
        if len(t.logprobs) != len(t.response_ids):
            raise ValueError(
                f"transition {t.rollout_id}/{t.step}: {len(t.logprobs)} logprobs for {len(t.response_ids)} tokens"
            )
        mask = t.response_mask if t.response_mask else [1] * len(t.response_ids)
        if len(mask) != len(t.response_ids):
            raise ValueError(f"transition {t.rollout_id}/{t.step}: mask length differs from the response")
        return _Item(
            ids=list(t.prompt_ids) + list(t.response_ids),
            prompt_len=len(t.prompt_ids),
            old_logprobs=[float(x) for x in t.logprobs],
            mask=[float(m) for m in mask],
            advantage=float(t.advantage),
        )

    def _micro_batches(self, items: Sequence[_Item]) -> list[list[int]]:
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

    def update(self, transitions: Sequence[Transition]) -> dict[str, float]:
        """One GRPO update (config.epochs optimizer steps) on a batch; returns metrics."""
        cfg = self.config
        t0 = time.perf_counter()
        items = [self._item(t) for t in transitions]
        total_tokens = sum(sum(it.mask) for it in items)
        metrics: dict[str, float] = {"transitions": float(len(items)), "trained_tokens": float(total_tokens)}
        if total_tokens == 0:
            log.warning("GRPO update skipped: no trainable tokens")
            return {**metrics, "optimizer_steps": 0.0, "step": float(self.step)}
        active = [it for it in items if not (cfg.skip_zero_advantage and cfg.kl_coef == 0 and it.advantage == 0.0)]
        batches = [self._collate([active[i] for i in idx]) for idx in self._micro_batches(active)]
        refs: list[torch.Tensor | None] = [None] * len(batches)
        if cfg.kl_coef > 0:
            self.model.eval()
            with torch.no_grad(), self._reference() as ref:
                refs = [self._token_logprobs(ref, b) for b in batches]
            self.model.train()

        hi = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
        sums = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "clip": 0.0, "ratio": 0.0, "approx_kl_old": 0.0}
        steps, grad_norm, counted = 0, 0.0, 0.0
        forwarded = 0
        for _ in range(cfg.epochs if batches else 0):
            self.optimizer.zero_grad(set_to_none=True)
            for batch, ref_lp in zip(batches, refs):
                lp = self._token_logprobs(self.model, batch)
                log_ratio = (lp - batch.old_logprobs).clamp(-20.0, 20.0)
                ratio = torch.exp(log_ratio)
                adv = batch.advantages
                pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - cfg.clip_eps, 1.0 + hi))
                per_token = pg
                if ref_lp is not None:
                    d = (ref_lp - lp).clamp(-20.0, 20.0)
                    kl = torch.exp(d) - d - 1.0  # k3: unbiased, always >= 0
                    per_token = pg + cfg.kl_coef * kl
                    sums["kl"] += float((kl.detach() * batch.mask).sum())
                loss = (per_token * batch.mask).sum() / total_tokens
                loss.backward()
                m = batch.mask
                with torch.no_grad():
                    sums["loss"] += float(loss)
                    sums["pg_loss"] += float((pg * m).sum())
                    clipped = ((ratio < 1.0 - cfg.clip_eps) & (adv < 0)) | ((ratio > 1.0 + hi) & (adv > 0))
                    sums["clip"] += float((clipped.float() * m).sum())
                    sums["ratio"] += float((ratio * m).sum())
                    sums["approx_kl_old"] += float((0.5 * log_ratio**2 * m).sum())
                    counted += float(m.sum())
                forwarded += batch.tokens
            stepped, grad_norm = self._optimizer_step(cfg.max_grad_norm)
            steps += int(stepped)
        elapsed = time.perf_counter() - t0
        self.tokens_seen += forwarded
        denom = max(counted, 1.0)
        epochs = max(cfg.epochs, 1)
        metrics.update(
            loss=sums["loss"] / epochs,
            pg_loss=sums["pg_loss"] / denom,
            kl=sums["kl"] / denom,
            clip_frac=sums["clip"] / denom,
            ratio_mean=sums["ratio"] / denom,
            approx_kl_old=sums["approx_kl_old"] / denom,
            grad_norm=grad_norm,
            optimizer_steps=float(steps),
            step=float(self.step),
            forwarded_tokens=float(forwarded),
            time_s=elapsed,
            tokens_per_s=forwarded / elapsed if elapsed > 0 else 0.0,
            response_tokens_per_s=counted / elapsed if elapsed > 0 else 0.0,
        )
        log.info("GRPO step %d: %s", self.step, {k: round(v, 4) for k, v in metrics.items()})
        return metrics

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

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore policy weights, optimizer state and step written by `checkpoint`."""
        from safetensors.torch import load_file

        path = Path(path)
        policy = path / POLICY_DIR
        if self.config.lora is not None:
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(self.model, load_file(str(policy / "adapter_model.safetensors")))
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"checkpoint does not match the LoRA layout: {result.unexpected_keys[:5]}")
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
        log.info("resumed GRPO learner from %s at step %d", path, self.step)
