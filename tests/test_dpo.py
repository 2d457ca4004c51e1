"""DPO: the loss against a hand computation, and one update on the tiny model favours the chosen answer."""

from __future__ import annotations

import math
import random

import pytest
import torch

from agentkiln.algorithms.dpo import DPOConfig, PreferencePair, train_dpo
from agentkiln.engine.model_files import tiny_model_dir
from agentkiln.models import Transition
from agentkiln.training.config import LoraSettings
from agentkiln.training.learner import Learner
from agentkiln.training.losses import dpo_loss, sequence_logprobs


def test_dpo_loss_matches_a_hand_computation() -> None:
    pi_c, pi_r = torch.tensor([-3.0, -1.0]), torch.tensor([-5.0, -0.5])
    ref_c, ref_r = torch.tensor([-4.0, -1.0]), torch.tensor([-4.5, -2.0])
    terms = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5)
    # pair 0: 0.5 * ((-3 + 4) - (-5 + 4.5)) = 0.75; pair 1: 0.5 * ((-1 + 1) - (-0.5 + 2)) = -0.75
    assert terms.margin.tolist() == pytest.approx([0.75, -0.75])
    expected = [math.log(1 + math.exp(-0.75)), math.log(1 + math.exp(0.75))]  # -log sigmoid(x) = log(1 + e^-x)
    assert terms.loss.tolist() == pytest.approx(expected)
    # Policy equal to the reference: log 2 whatever beta, the loss of an undecided preference.
    assert float(dpo_loss(ref_c, ref_r, ref_c, ref_r, beta=3.0).loss[0]) == pytest.approx(math.log(2))


def test_sequence_logprobs_sums_only_trained_tokens() -> None:
    lp = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0])
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0])
    assert sequence_logprobs(lp, mask, [3, 2]).tolist() == [-4.0, -9.0]


def _pairs(n: int = 4, seed: int = 0) -> list[PreferencePair]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(1, 1000) for _ in range(6)]
        chosen = [rng.randrange(1, 1000) for _ in range(4)]
        rejected = [rng.randrange(1, 1000) for _ in range(5)]

        chosen_t, rejected_t = (
            Transition(rollout_id=f"r{i}-{k}", attempt_id="a", step=0, prompt_ids=prompt, response_ids=resp,
                       logprobs=[0.0] * len(resp))
            for k, resp in enumerate((chosen, rejected))
        )
        out.append(PreferencePair(chosen=chosen_t, rejected=rejected_t, source="ratings"))
    return out


def _margin(learner: Learner, pairs: list[PreferencePair]) -> float:
    """Mean of log pi(chosen) - log pi(rejected), summed over response tokens."""
    lp_c = learner.logprobs([p.chosen for p in pairs])
    lp_r = learner.logprobs([p.rejected for p in pairs])
    return sum(sum(c) - sum(r) for c, r in zip(lp_c, lp_r)) / len(pairs)


def test_one_dpo_update_raises_the_chosen_vs_rejected_margin() -> None:
    pairs = _pairs()
    learner = Learner(tiny_model_dir(), DPOConfig(lr=5e-2, beta=0.1, batch_size=4, bf16=False,
                                                  lora=LoraSettings(r=4, alpha=8), micro_batch_size=4))
    before = _margin(learner, pairs)
    metrics = learner.update_pairs([p.as_tuple() for p in pairs])
    assert metrics["optimizer_steps"] == 1 and metrics["pairs"] == 4
    # Fresh LoRA: the policy is the reference (adapter switched off), so the first loss is log 2.
    assert metrics["first_loss"] == pytest.approx(math.log(2), abs=1e-4)
    after = _margin(learner, pairs)
    assert after > before + 0.1, (before, after)
    # The reference stays the base model: switching the adapter off gives the starting log-probs.
    ref = learner.logprobs([pairs[0].chosen], reference=True)[0]
    fresh = Learner(tiny_model_dir(), DPOConfig(bf16=False, lora=LoraSettings(r=4, alpha=8)))
    assert ref == pytest.approx(fresh.logprobs([pairs[0].chosen])[0], abs=1e-4)


def test_pairs_must_share_the_prompt_and_differ() -> None:
    p = _pairs(1)[0]
    other = p.rejected.model_copy(update={"prompt_ids": [1, 2, 3]})
    with pytest.raises(ValueError, match="same prompt"):
        PreferencePair(chosen=p.chosen, rejected=other)
    with pytest.raises(ValueError, match="same answer"):
        PreferencePair(chosen=p.chosen, rejected=p.chosen)
    with pytest.raises(ValueError, match="pairs"):
        Learner(tiny_model_dir(), DPOConfig(bf16=False)).update([p.chosen])


def test_train_dpo_saves_an_adapter(tmp_path) -> None:
    result = train_dpo(_pairs(2), tmp_path, model_dir=tiny_model_dir(),
                       config=DPOConfig(lr=1e-2, bf16=False, lora=LoraSettings(r=2, alpha=4)))
    assert result.pairs == 2 and result.metrics[0]["optimizer_steps"] == 1
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
