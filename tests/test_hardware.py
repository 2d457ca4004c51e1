"""Precision follows the hardware: bf16 only where the device has bf16 matrix units."""

from __future__ import annotations

import pytest
import torch

from agentkiln import hardware
from agentkiln.algorithms.grpo import GRPOConfig
from agentkiln.engine.model_files import tiny_model_dir
from agentkiln.training import learner as learner_mod


@pytest.mark.parametrize("fast", [True, False])
def test_auto_dtype_is_bf16_only_where_fast(fast: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "bf16_is_fast", lambda device_type: fast)
    assert hardware.resolve_dtype("auto", "cpu") == (torch.bfloat16 if fast else torch.float32)
    assert hardware.resolve_dtype("float32", "cpu") == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        hardware.resolve_dtype("float33", "cpu")


@pytest.mark.parametrize("fast", [True, False])
def test_learner_autocasts_only_where_bf16_is_fast(fast: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(learner_mod, "bf16_is_fast", lambda device_type: fast)
    learner = learner_mod.Learner(tiny_model_dir(), GRPOConfig(bf16=True))
    assert learner.amp is fast
    frozen = [m.weight.dtype for n, m in learner.model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n]
    assert (torch.bfloat16 in frozen) is fast


def test_cpu_probe_matches_torch_capabilities() -> None:
    hardware.bf16_is_fast.cache_clear()
    expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert hardware.bf16_is_fast("cpu") is expected
