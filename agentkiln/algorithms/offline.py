"""Offline training: learn from rollouts already in a store (e.g. production traffic), without running the agent.

The traces (`agentkiln.training.trace.load_traces`) carry everything a token-level update needs
(prompt/response token ids and sampling-time logprobs recorded by the gateway), so a store file
is a data set:

* ``sft``: keep the best rollouts (reward threshold / top-k per task) and imitate them.
  Works on traces from any model.
* ``grpo``: group rollouts of the same task (metadata group_id, else identical input),
  advantages from the group rewards, clipped policy-gradient updates. The ratio is taken
  against the recorded logprobs, so the traces must come from the weights being trained
  (or close to them); far-off traces are clipped away and teach little: use sft then.

``backend="trl"`` trains the same selection with TRL's trainers instead of our learner
(agentkiln/backends/trl: accelerate / DeepSpeed configurations through ``trl.args``); GRPO then
gets every transition, since TRL forms its groups and advantages itself.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from agentkiln.adapter.credit import CreditConfig
from agentkiln.adapter.transitions import build_batch
from agentkiln.algorithms.grpo.config import GRPOConfig
from agentkiln.algorithms.sft.algorithm import select_best
from agentkiln.algorithms.sft.config import SFTConfig
from agentkiln.backends import Backend, check_backend
from agentkiln.backends.trl.config import TRLBackendConfig
from agentkiln.models import Transition
from agentkiln.training.config import ADAPTER_DIR
from agentkiln.training.trace import Trace, skip_counts

log = logging.getLogger(__name__)

RESULT_FILE = "offline_result.json"


@dataclass
class OfflineConfig:
    """What to train on and how.

    batch_size: transitions per GRPO update (SFT batches with sft.batch_size).
    epochs: passes over the data (for SFT it overrides sft.epochs).
    backend: "kiln" (our learner, `sft` / `grpo` settings) or "trl" (TRL's trainers, `trl` settings).
    """

    algorithm: Literal["sft", "grpo"] = "sft"
    backend: Backend = "kiln"
    model_dir: str | None = None
    agent_match: str | None = None
    merge_turns: bool = False
    credit: CreditConfig = field(default_factory=CreditConfig)
    min_reward: float | None = 1.0
    top_k: int | None = None
    epochs: int = 1
    batch_size: int = 32
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    trl: TRLBackendConfig = field(default_factory=TRLBackendConfig)

    def __post_init__(self) -> None:
        check_backend(self.backend)


@dataclass
class OfflineResult:
    rollouts: int
    transitions: int
    trained_transitions: int
    skipped: dict[str, int]
    metrics: list[dict[str, float]]
    adapter: str | None
    elapsed_s: float


def select_training_data(
    traces: Sequence[Trace], config: OfflineConfig
) -> tuple[list[Transition], list[Transition], dict[str, int]]:
    """(all transitions, the ones trained on, skip counts) for the configured algorithm."""
    transitions, skipped = build_batch(
        traces, agent_match=config.agent_match, credit=config.credit, merge=config.merge_turns
    )
    if config.algorithm == "sft":
        chosen = select_best(transitions, min_reward=config.min_reward, top_k=config.top_k)
    elif config.backend == "trl":
        chosen = list(transitions)  # TRL computes group advantages from the returns itself
    else:
        chosen = [t for t in transitions if t.advantage != 0.0]
    return transitions, chosen, skip_counts(skipped)


def train_offline(traces: Sequence[Trace], out_dir: str | Path, config: OfflineConfig | None = None) -> OfflineResult:
    """Build transitions from stored traces, train (SFT or GRPO), save the adapter in out_dir/adapter."""
    from agentkiln.engine.model_files import smollm2_dir
    from agentkiln.training.learner import Learner

    config = config or OfflineConfig()
    started = time.monotonic()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    transitions, chosen, skipped = select_training_data(traces, config)
    log.info(
        "offline %s: %d rollouts -> %d transitions, %d to train on; left out: %s",
        config.algorithm,
        len(traces),
        len(transitions),
        len(chosen),
        skipped,
    )
    metrics: list[dict[str, float]] = []
    adapter: str | None = None
    if chosen and config.backend == "trl":
        from agentkiln.backends.trl import train_with_trl

        trl_config = replace(config.trl, algorithm=config.algorithm, epochs=config.epochs)
        trained = train_with_trl(chosen, config.model_dir or smollm2_dir(), out, trl_config)
        metrics, adapter = trained.metrics, trained.adapter
        skipped = {**skipped, **{f"trl: {k}": v for k, v in trained.dropped.items()}}
    elif chosen:
        model_dir = config.model_dir or smollm2_dir()
        if config.algorithm == "sft":
            learner = Learner(model_dir, replace(config.sft, epochs=config.epochs))
            metrics.append(learner.update(chosen))
        else:
            learner = Learner(model_dir, replace(config.grpo, epochs=1))
            size = max(1, config.batch_size)
            for _ in range(max(1, config.epochs)):
                for i in range(0, len(chosen), size):
                    metrics.append(learner.update(chosen[i : i + size]))
        adapter = str(learner.save(out / ADAPTER_DIR))
    else:
        log.warning(
            "offline %s: nothing to train on (no rollout passed the filter / all advantages 0)", config.algorithm
        )
    result = OfflineResult(
        rollouts=len(traces),
        transitions=len(transitions),
        trained_transitions=len(chosen),
        skipped=skipped,
        metrics=metrics,
        adapter=adapter,
        elapsed_s=round(time.monotonic() - started, 2),
    )
    (out / RESULT_FILE).write_text(json.dumps(asdict(result), indent=2))
    return result
