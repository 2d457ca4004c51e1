"""Settings every causal-LM update shares; each algorithm's config extends them with its loss's.

Why a base class: the learner (loading, LoRA, precision, micro-batching, the optimizer) is the
same for GRPO and SFT, so its knobs are declared once and `GRPOConfig` / `SFTConfig` add only
what their objective needs, plus `objective()`, which builds that loss for the learner.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

ADAPTER_DIR = "adapter"  # the trained weights' folder inside an offline / production / backend run's output

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS

    def peft_config(self) -> Any:
        """These settings as peft's LoraConfig for a causal LM (our learner and the TRL backend alike)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            task_type="CAUSAL_LM",
        )


@dataclass
class LearnerConfig:
    """The learner's settings.

    lora=None trains all weights (fp32 master weights, ~4x slower per token on CPU).
    bf16: autocast in the device's reduced precision (see `device`); with LoRA the frozen
        decoder weights are stored in it.
    share_prompt: run a prompt shared by several transitions (a GRPO group) once per
        micro-batch (same loss; saves the prompt's cost k-1 times): packed, any common prefix
        is one trie node; padded, the prompt's KV cache is repeated for the rows.
    logits_chunk: above this many response tokens per micro-batch, the [tokens, vocab] logits
        are not kept for the backward pass (recomputed slice by slice, bounded memory).
    pack: tree-pack micro-batches (no padding, shared prefixes once; see `packing`); the
        padded layouts are used when False or when the model's attention cannot be switched.
    device: "auto" (cuda when available, else cpu), or any torch device string.
    """

    lr: float = 1e-4
    micro_batch_size: int = 8
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    lora: LoraSettings | None = field(default_factory=LoraSettings)
    bf16: bool = True
    share_prompt: bool = True
    logits_chunk: int = 2048
    pack: bool = True
    device: str = "auto"

    def objective(self) -> Any:
        """The loss object the learner's `update` runs (see `losses`)."""
        raise NotImplementedError(f"{type(self).__name__} names no objective")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["lora"] is not None:
            d["lora"]["target_modules"] = list(d["lora"]["target_modules"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        d = dict(d)
        lora = d.pop("lora", None)
        if lora is not None:
            lora = LoraSettings(**{**lora, "target_modules": tuple(lora["target_modules"])})
        return cls(lora=lora, **d)
