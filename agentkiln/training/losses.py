"""The losses the learner trains with: plain functions, and one objective object per algorithm.

The functions are the math (`grpo_loss`, `sft_loss`, `dpo_loss`). An objective (`GRPOObjective`,
`SFTObjective`, `DPOObjective`) is what `Learner.update` runs: which transitions count, how they are cut into
optimizer steps, which log-probs to score under, and the metrics it reports. Everything about
the model (forward passes, micro-batching, the optimizer) stays in the learner, so a new
algorithm is a new objective, not a new learner subclass.

The GRPO and SFT losses are token means over the whole optimizer step (every micro-batch divides
by the step's total trained-token count), so gradient accumulation gives the same step as one
batch; the DPO loss is a mean over the step's pairs, each pair kept inside one micro-batch.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from agentkiln.training.packing import Batch, Item

log = logging.getLogger(__name__)


class GRPOTerms(NamedTuple):
    loss: torch.Tensor  # scalar: this micro-batch's share of the step's token-mean loss
    pg: torch.Tensor  # [N] clipped policy-gradient term per token
    ratio: torch.Tensor  # [N] pi / pi_old
    log_ratio: torch.Tensor  # [N] clamped log of it
    kl: torch.Tensor | None  # [N] k3 estimate to the reference (None without one)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    total_tokens: float,
    clip_eps: float,
    clip_eps_high: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    max_ratio: float | None = None,
) -> GRPOTerms:
    """Clipped-ratio policy gradient against the recorded (sampling-time) logprobs, plus an
    optional k3 KL to the reference (unbiased, always >= 0).

    max_ratio: the truncated-importance-weight cap (dual clip). The clipped surrogate bounds the
    ratio only where the update would raise it for a good token; for a negative advantage the
    term -A * ratio keeps growing with the ratio, so a token the current policy finds far likelier
    than the recorded one (far-off-policy data: production calls served by another version) would
    take an unbounded step. Capping it at -A * max_ratio zeroes the gradient beyond the cap; with
    the usual clip on the other side, no token weighs more than max(max_ratio, 1 + clip_eps_high).
    """
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    pg = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + hi))
    if max_ratio is not None:
        pg = torch.where(advantages < 0, torch.minimum(pg, -advantages * max_ratio), pg)
    per_token, kl = pg, None
    if ref_logprobs is not None:
        d = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
        kl = torch.exp(d) - d - 1.0
        per_token = pg + kl_coef * kl
    return GRPOTerms((per_token * mask).sum() / total_tokens, pg, ratio, log_ratio, kl)


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor, total_tokens: float) -> torch.Tensor:
    """Masked cross-entropy: negative log-likelihood of the trained response tokens, token mean."""
    return -(logprobs * mask).sum() / total_tokens


class DPOTerms(NamedTuple):
    loss: torch.Tensor  # [P] per pair
    margin: torch.Tensor  # [P] beta * ((pi_c - ref_c) - (pi_r - ref_r)): the implicit reward margin


def dpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> DPOTerms:
    """Direct preference optimisation (Rafailov et al. 2023), per pair:
    -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), each term a sequence's summed
    response-token log-prob under the policy (pi) or the reference (ref)."""
    margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return DPOTerms(-F.logsigmoid(margin), margin)


def sequence_logprobs(logprobs: torch.Tensor, mask: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """[B] summed log-probs of the trained tokens of each sequence, from a micro-batch's [N] token log-probs."""
    return torch.stack([part.sum() for part in (logprobs * mask).split(list(lengths))])


def _finish(learner: Any, name: str, metrics: dict[str, float], t0: float, forwarded: int) -> dict[str, float]:
    """Add the step count and throughput every objective reports, and log the update."""
    elapsed = time.perf_counter() - t0
    learner.tokens_seen += forwarded
    metrics.update(step=float(learner.step), time_s=elapsed, tokens_per_s=forwarded / elapsed if elapsed > 0 else 0.0)
    log.info("%s step %d: %s", name, learner.step, {k: round(v, 4) for k, v in metrics.items()})
    return metrics


class GRPOObjective:
    """One GRPO update: `config.epochs` optimizer steps over the same micro-batches.

    The settings are read from the config (a GRPOConfig: clip_eps, clip_eps_high, kl_coef,
    epochs, skip_zero_advantage, temperature), so they are declared once, there.
    """

    per_call_temperature = True  # log-probs under each call's recorded temperature (config's: fallback)

    def __init__(self, config: Any) -> None:
        self.config = config

    @property
    def temperature(self) -> float:
        return self.config.temperature

    @property
    def needs_reference(self) -> bool:
        return self.config.kl_coef > 0

    def run(self, learner: Any, items: Sequence[Item], t0: float) -> dict[str, float]:
        total = sum(sum(it.mask) for it in items)
        metrics: dict[str, float] = {"transitions": float(len(items)), "trained_tokens": float(total)}
        if total == 0:
            log.warning("GRPO update skipped: no trainable tokens")
            return {**metrics, "optimizer_steps": 0.0, "step": float(learner.step)}
        cfg = self.config
        skip = cfg.skip_zero_advantage and cfg.kl_coef == 0
        active = [it for it in items if not (skip and it.advantage == 0.0)]
        batches = [learner._collate([active[i] for i in idx]) for idx in learner._micro_batches(active)]
        refs: list[torch.Tensor | None] = [None] * len(batches)
        if self.needs_reference:
            learner.model.eval()
            with torch.no_grad(), learner._reference() as ref:
                refs = [learner._token_logprobs(ref, b) for b in batches]
            learner.model.train()

        hi = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
        cap = getattr(cfg, "max_importance_weight", None)
        sums = dict.fromkeys(("loss", "pg_loss", "kl", "clip", "capped", "ratio", "approx_kl_old", "counted"), 0.0)

        def loss_fn(lp: torch.Tensor, batch: Batch, ref_lp: torch.Tensor | None) -> torch.Tensor:
            m, adv = batch.mask, batch.advantages
            t = grpo_loss(
                lp, batch.old_logprobs, adv, m, total, cfg.clip_eps, cfg.clip_eps_high, ref_lp, cfg.kl_coef, cap
            )
            with torch.no_grad():
                if t.kl is not None:
                    sums["kl"] += float((t.kl * m).sum())
                sums["loss"] += float(t.loss)
                sums["pg_loss"] += float((t.pg * m).sum())
                clipped = ((t.ratio < 1.0 - cfg.clip_eps) & (adv < 0)) | ((t.ratio > 1.0 + hi) & (adv > 0))
                sums["clip"] += float((clipped.float() * m).sum())
                if cap is not None:
                    sums["capped"] += float((((t.ratio > cap) & (adv < 0)).float() * m).sum())
                sums["ratio"] += float((t.ratio * m).sum())
                sums["approx_kl_old"] += float((0.5 * t.log_ratio**2 * m).sum())
                sums["counted"] += float(m.sum())
                if bool((m > 0).any()):  # the worst trained token: 0 on an on-policy first step
                    dev = float(((t.ratio - 1.0).abs() * (m > 0)).max())
                    sums["ratio_dev_max"] = max(sums.get("ratio_dev_max", 0.0), dev)
            return t.loss

        steps, grad_norm, forwarded = 0, 0.0, 0
        for _ in range(cfg.epochs if batches else 0):
            stepped, grad_norm, fwd = learner.step_on(batches, loss_fn, refs)
            steps += int(stepped)
            forwarded += fwd
        denom = max(sums["counted"], 1.0)
        metrics.update(
            loss=sums["loss"] / max(cfg.epochs, 1),
            pg_loss=sums["pg_loss"] / denom,
            kl=sums["kl"] / denom,
            clip_frac=sums["clip"] / denom,
            capped_frac=sums["capped"] / denom,
            ratio_mean=sums["ratio"] / denom,
            approx_kl_old=sums["approx_kl_old"] / denom,
            ratio_dev_max=sums.get("ratio_dev_max", 0.0),
            grad_norm=grad_norm,
            optimizer_steps=float(steps),
            forwarded_tokens=float(forwarded),
        )
        metrics = _finish(learner, "GRPO", metrics, t0, forwarded)
        metrics["response_tokens_per_s"] = sums["counted"] / metrics["time_s"] if metrics["time_s"] > 0 else 0.0
        return metrics


class SFTObjective:
    """Imitation: `config.epochs` passes over the transitions in shuffled batches of
    `config.batch_size`, one optimizer step each (settings read from an SFTConfig). Scores under
    temperature 1: imitation maximises the plain likelihood."""

    temperature = 1.0
    per_call_temperature = False
    needs_reference = False

    def __init__(self, config: Any) -> None:
        self.config = config
        self._rng = random.Random(config.seed)  # one stream across updates: each update shuffles anew

    def run(self, learner: Any, items: Sequence[Item], t0: float) -> dict[str, float]:
        items = [it for it in items if sum(it.mask) > 0]
        metrics: dict[str, float] = {"transitions": float(len(items))}
        if not items:
            log.warning("SFT update skipped: no trainable tokens")
            return {**metrics, "optimizer_steps": 0.0, "trained_tokens": 0.0}
        epochs, batch_size = self.config.epochs, self.config.batch_size
        losses: list[float] = []
        steps, tokens, forwarded = 0, 0.0, 0
        for _ in range(max(1, epochs)):
            order = list(range(len(items)))
            self._rng.shuffle(order)
            for start in range(0, len(order), max(1, batch_size)):
                chunk = [items[i] for i in order[start : start + batch_size]]
                total = sum(sum(it.mask) for it in chunk)
                loss_sum = [0.0]

                def loss_fn(
                    lp: torch.Tensor, batch: Batch, _ref: Any, total: float = total, acc: list[float] = loss_sum
                ) -> torch.Tensor:
                    loss = sft_loss(lp, batch.mask, total)
                    acc[0] += float(loss.detach())
                    return loss

                batches = [learner._collate([chunk[i] for i in idx]) for idx in learner._micro_batches(chunk)]
                stepped, _, fwd = learner.step_on(batches, loss_fn)
                forwarded += fwd
                if not stepped:
                    continue
                steps += 1
                tokens += total
                losses.append(loss_sum[0])
        metrics.update(
            loss=losses[-1] if losses else float("nan"),
            first_loss=losses[0] if losses else float("nan"),
            optimizer_steps=float(steps),
            trained_tokens=tokens / max(1, epochs),
        )
        return _finish(learner, "SFT", metrics, t0, forwarded)


class DPOObjective:
    """Preference pairs: `config.epochs` passes in shuffled batches of `config.batch_size` pairs,
    one optimizer step each (settings read from a DPOConfig: beta, epochs, batch_size, seed).

    The items come in pairs, (chosen, rejected) at even/odd positions (`Learner.update_pairs`).
    Both sequences of a pair go into one micro-batch (the loss is a function of the pair, not a
    sum over sequences), so they share their prompt's forward in the packed tree. The reference
    is the learner's (`Learner._reference`: the base model with the LoRA switched off, no second
    copy), scored once per step before the policy's forward. Scores under temperature 1: the
    preference is about the model's own distribution, not a sampling setting.
    """

    temperature = 1.0
    per_call_temperature = False
    needs_reference = True

    def __init__(self, config: Any) -> None:
        self.config = config
        self._rng = random.Random(config.seed)

    def run(self, learner: Any, items: Sequence[Item], t0: float) -> dict[str, float]:
        if len(items) % 2:
            raise ValueError(f"DPO trains on (chosen, rejected) pairs; got {len(items)} sequences")
        pairs = [(items[i], items[i + 1]) for i in range(0, len(items), 2)]
        pairs = [p for p in pairs if sum(p[0].mask) > 0 and sum(p[1].mask) > 0]
        metrics: dict[str, float] = {"pairs": float(len(pairs))}
        if not pairs:
            log.warning("DPO update skipped: no pair with trainable tokens on both sides")
            return {**metrics, "optimizer_steps": 0.0}
        cfg = self.config
        per_micro = max(1, learner.config.micro_batch_size // 2)
        sums = dict.fromkeys(("loss", "margin", "accuracy", "chosen", "rejected", "counted"), 0.0)
        losses: list[float] = []
        steps, forwarded = 0, 0
        for _ in range(max(1, cfg.epochs)):
            order = list(range(len(pairs)))
            self._rng.shuffle(order)
            for start in range(0, len(order), max(1, cfg.batch_size)):
                chunk = [pairs[i] for i in order[start : start + cfg.batch_size]]
                batches = [
                    learner._collate([seq for pair in chunk[i : i + per_micro] for seq in pair])
                    for i in range(0, len(chunk), per_micro)
                ]
                learner.model.eval()
                with torch.no_grad(), learner._reference() as ref:
                    refs = [learner._token_logprobs(ref, b) for b in batches]
                learner.model.train()
                step_loss = [0.0]

                def loss_fn(
                    lp: torch.Tensor, batch: Batch, ref_lp: Any, n: int = len(chunk), acc: list[float] = step_loss
                ) -> torch.Tensor:
                    seq = sequence_logprobs(lp, batch.mask, batch.lengths)
                    ref_seq = sequence_logprobs(ref_lp, batch.mask, batch.lengths)
                    t = dpo_loss(seq[0::2], seq[1::2], ref_seq[0::2], ref_seq[1::2], cfg.beta)
                    loss = t.loss.sum() / n
                    with torch.no_grad():
                        acc[0] += float(loss)
                        sums["margin"] += float(t.margin.sum())
                        sums["accuracy"] += float((t.margin > 0).float().sum())
                        sums["chosen"] += float((seq[0::2] - ref_seq[0::2]).sum())
                        sums["rejected"] += float((seq[1::2] - ref_seq[1::2]).sum())
                        sums["counted"] += float(t.loss.numel())
                    return loss

                stepped, _, fwd = learner.step_on(batches, loss_fn, refs)
                forwarded += fwd
                if stepped:
                    steps += 1
                    losses.append(step_loss[0])
        denom = max(sums["counted"], 1.0)
        metrics.update(
            loss=losses[-1] if losses else float("nan"),
            first_loss=losses[0] if losses else float("nan"),
            margin=sums["margin"] / denom,  # the implicit reward margin, as scored during the steps
            accuracy=sums["accuracy"] / denom,
            chosen_logratio=sums["chosen"] / denom,
            rejected_logratio=sums["rejected"] / denom,
            optimizer_steps=float(steps),
        )
        return _finish(learner, "DPO", metrics, t0, forwarded)
