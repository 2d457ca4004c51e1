"""DPO from preference pairs: (chosen, rejected) answers to the same prompt, no reward model.

Why next to SFT and GRPO: a correction ("this is what I wanted") or two differently rated answers
to one prompt say which of two answers is better, not how good either is. DPO learns exactly that
comparison, against the base model as reference, so it uses data SFT (needs good answers) and GRPO
(needs recorded log-probs and comparable rewards) cannot. Pairs come from production feedback
(`agentkiln.production.dataset`) or from anywhere that builds `PreferencePair`s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from agentkiln.algorithms.dpo.config import DPOConfig
from agentkiln.models import Transition

log = logging.getLogger(__name__)

__all__ = ["DPOResult", "PreferencePair", "train_dpo"]


class PreferencePair(BaseModel):
    """Two answers to one prompt, the better one first. Only token ids and masks are trained on."""

    model_config = ConfigDict(extra="forbid")

    chosen: Transition
    rejected: Transition
    source: Literal["correction", "ratings", "other"] = "other"
    feedback_id: str | None = None  # the correction it came from

    @model_validator(mode="after")
    def _same_prompt(self) -> PreferencePair:
        if self.chosen.prompt_ids != self.rejected.prompt_ids:
            raise ValueError("chosen and rejected must answer the same prompt (same prompt_ids)")
        if self.chosen.response_ids == self.rejected.response_ids:
            raise ValueError("chosen and rejected are the same answer")
        return self

    def as_tuple(self) -> tuple[Transition, Transition]:
        return self.chosen, self.rejected


@dataclass
class DPOResult:
    pairs: int
    metrics: list[dict[str, float]] = field(default_factory=list)
    adapter: str | None = None
    elapsed_s: float = 0.0


def train_dpo(
    pairs: Sequence[PreferencePair],
    out_dir: str | Path,
    *,
    model_dir: str | Path | None = None,
    config: DPOConfig | None = None,
    adapter_dir: str = "adapter",
) -> DPOResult:
    """Fine-tune on `pairs` (config.epochs passes) and save the weights in out_dir/adapter_dir."""
    from agentkiln.engine.model_files import smollm2_dir
    from agentkiln.training.learner import Learner

    started = time.monotonic()
    result = DPOResult(pairs=len(pairs))
    if not pairs:
        log.warning("DPO: no preference pairs; nothing trained")
        return result
    learner = Learner(model_dir or smollm2_dir(), config or DPOConfig())
    result.metrics.append(learner.update_pairs([p.as_tuple() for p in pairs]))
    result.adapter = str(learner.save(Path(out_dir) / adapter_dir))
    result.elapsed_s = round(time.monotonic() - started, 2)
    return result
