"""Settings of the TRL backend: the few we choose, everything else passed to TRL's own config.

Why a pass-through (`args`): users who reach for TRL want its accelerate / DeepSpeed / FSDP
knobs (`deepspeed=`, `fsdp=`, `gradient_checkpointing=`, `optim=`, ...); naming each here would
lag TRL. `args` keys are checked against the chosen trainer's config class, so a typo is an
error, not a silently ignored setting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from agentkiln.training.config import LoraSettings

Algorithm = Literal["sft", "dpo", "grpo"]


@dataclass
class TRLBackendConfig:
    """What TRL trains and how.

    lora: None trains all weights (then the output folder is a full model the engine can serve).
    batch_size: examples per device step (GRPO: completions; each group must fit, see train.py).
    bf16: None = on when the device has fast bf16 (agentkiln.hardware), as our learner decides.
    device: "auto" (CUDA when present), "cpu" or "cuda"; accelerate places the model.
    beta: DPO's beta; GRPO's KL coefficient (TRL's default 0.0: no reference model).
    args: any other field of trl.SFTConfig / DPOConfig / GRPOConfig, passed through unchanged.
    """

    algorithm: Algorithm = "sft"
    lora: LoraSettings | None = field(default_factory=LoraSettings)
    lr: float = 1e-4
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int | None = 4096
    beta: float | None = None
    bf16: bool | None = None
    device: str = "auto"
    seed: int = 0
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.algorithm not in ("sft", "dpo", "grpo"):
            raise ValueError(f"unknown algorithm {self.algorithm!r}: use sft, dpo or grpo")
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not self.lr > 0:
            raise ValueError("lr must be positive")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device {self.device!r}: use auto, cpu or cuda")
