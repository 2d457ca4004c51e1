"""Far-off-policy GRPO data: the truncated importance weight (dual clip) bounds a negative-advantage step."""

from __future__ import annotations

import pytest
import torch

from agentkiln.algorithms.grpo import GRPOConfig, LoraSettings
from agentkiln.engine.model_files import tiny_model_dir
from agentkiln.models import Transition
from agentkiln.training.learner import Learner
from agentkiln.training.losses import grpo_loss


def _terms(ratio: float, advantage: float, cap: float | None):
    lp = torch.tensor([0.0], requires_grad=True)
    old = torch.tensor([-float(torch.log(torch.tensor(ratio)))])
    t = grpo_loss(lp, old, torch.tensor([advantage]), torch.ones(1), 1.0, 0.2, max_ratio=cap)
    t.loss.backward()
    return float(t.loss), float(lp.grad[0])


def test_cap_bounds_the_negative_advantage_term() -> None:
    # ratio 50, A = -1: the plain clipped surrogate is -A * r = 50 and still pushes (gradient 50).
    assert _terms(50.0, -1.0, None) == pytest.approx((50.0, 50.0), rel=1e-4)
    # capped at 3: the loss stops at -A * 3 and the token no longer moves the weights
    assert _terms(50.0, -1.0, 3.0) == pytest.approx((3.0, 0.0), abs=1e-4)
    # below the cap, and for positive advantages, the loss is unchanged
    assert _terms(2.0, -1.0, 3.0) == pytest.approx(_terms(2.0, -1.0, None), rel=1e-5)
    assert _terms(50.0, 1.0, 3.0) == pytest.approx(_terms(50.0, 1.0, None), rel=1e-5)


def _far_off(learner: Learner, n: int = 3) -> list[Transition]:
    """Responses recorded 4 nats per token less likely than the policy now finds them (ratio e^4 ~ 55):
    what calls served by another version look like."""
    ts = [
        Transition(rollout_id=f"r{i}", attempt_id="a", step=0, prompt_ids=[5 + i, 9, 17, 33],
                   response_ids=[40 + i, 41, 42], logprobs=[0.0] * 3, advantage=-1.0)
        for i in range(n)
    ]
    for t, lp in zip(ts, learner.logprobs(ts)):
        t.logprobs = [x - 4.0 for x in lp]
    return ts


def test_learner_applies_the_configured_cap() -> None:
    common = {"lr": 1e-2, "bf16": False, "lora": LoraSettings(r=2, alpha=4)}
    plain = Learner(tiny_model_dir(), GRPOConfig(**common))
    uncapped = plain.update(_far_off(plain))
    capping = Learner(tiny_model_dir(), GRPOConfig(**common, max_importance_weight=3.0))
    capped = capping.update(_far_off(capping))
    assert uncapped["grad_norm"] > 0 and uncapped["capped_frac"] == 0.0
    assert capped["capped_frac"] == 1.0 and capped["grad_norm"] == 0.0
    with pytest.raises(ValueError):
        GRPOConfig(max_importance_weight=0.5)
