"""The learner runs where the model fits: device="auto" takes CUDA when present, else the CPU, and
its tensors, autocast and the update all follow that device (nothing CPU-specific hard-coded)."""

from __future__ import annotations

import math

import pytest
import torch

from agentkiln.algorithms.grpo import GRPOConfig
from agentkiln.engine.model_files import tiny_model_dir
from agentkiln.models import Transition
from agentkiln.training.config import LoraSettings
from agentkiln.training.learner import Learner


def _one_update(device: str) -> tuple[Learner, dict[str, float]]:
    learner = Learner(tiny_model_dir(), GRPOConfig(lora=LoraSettings(r=4, alpha=8), device=device, lr=1e-3))
    t = Transition(
        rollout_id="r", attempt_id="a", step=0, prompt_ids=[1, 2, 3, 4], response_ids=[5, 6, 7],
        logprobs=[-1.0, -1.0, -1.0], advantage=1.0, temperature=1.0,
    )
    return learner, learner.update([t, t.model_copy(update={"advantage": -1.0, "response_ids": [8, 9, 10]})])


def test_auto_device_is_cuda_when_present_else_cpu():
    learner, metrics = _one_update("auto")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert learner.device.type == want
    assert {p.device.type for p in learner.model.parameters()} == {want}
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine: the CUDA learner path runs only on a GPU")
def test_learner_updates_on_cuda_with_its_autocast():
    learner, metrics = _one_update("cuda")
    assert learner.device.type == "cuda" and learner.amp  # bf16 (Ampere+) or fp16 autocast on the GPU
    trained = [p for n, p in learner.model.named_parameters() if "lora_B" in n]
    assert trained and all(p.device.type == "cuda" for p in trained)
    assert any(float(p.abs().sum()) > 0 for p in trained)  # the update moved the adapter on the GPU
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
