"""Offline training: learn from rollouts already in a store (e.g. production traffic), without running the agent.

The traces carry everything a token-level update needs (prompt/response token ids and
sampling-time logprobs recorded by the gateway), so a store file is a data set:

* ``sft``: keep the best rollouts (reward threshold / top-k per task) and imitate them.
  Works on traces from any model.
* ``grpo``: group rollouts of the same task (metadata group_id, else identical input),
  advantages from the group rewards, clipped policy-gradient updates. The ratio is taken
  against the recorded logprobs, so the traces must come from the weights being trained
  (or close to them); far-off traces are clipped away and teach little: use sft then.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from agentkiln.adapter.credit import CreditConfig
from agentkiln.adapter.transitions import SkippedCall, build_batch
from agentkiln.algorithms.grpo import GRPOConfig
from agentkiln.algorithms.sft import SFTConfig, select_best
from agentkiln.models import Attempt, Rollout, RolloutMode, RolloutStatus, Span, Transition
from agentkiln.store.base import Store

log = logging.getLogger(__name__)

Trace = tuple[Rollout, list[Attempt], list[Span]]
ADAPTER_DIR = "adapter"
RESULT_FILE = "offline_result.json"
PAGE = 500


async def load_traces(store: Store, *, mode: str | None = None, limit: int | None = None) -> list[Trace]:
    """Finished rollouts with their attempts and spans, oldest first (failed ones too: the adapter
    reports why they are left out)."""
    out: list[Trace] = []
    offset = 0
    while limit is None or len(out) < limit:
        page = await store.query_rollouts(
            status=[RolloutStatus.succeeded, RolloutStatus.failed],
            mode=RolloutMode(mode) if mode else None,
            limit=PAGE,
            offset=offset,
        )
        for rollout in page[: None if limit is None else limit - len(out)]:
            out.append((rollout, await store.query_attempts(rollout.rollout_id), await store.query_spans(rollout.rollout_id)))
        if len(page) < PAGE:
            break
        offset += PAGE
    return out


async def load_traces_from(url: str, *, api_key: str | None = None, **kwargs: Any) -> list[Trace]:
    """`load_traces` on a server URL (http...) or a store path/URL (runs/kiln.db, sqlite:///...)."""
    from agentkiln.store import open_store
    from agentkiln.store.client import HttpStore

    store = HttpStore(url, api_key=api_key) if url.startswith(("http://", "https://")) else open_store(url)
    try:
        return await load_traces(store, **kwargs)
    finally:
        await store.close()


@dataclass
class OfflineConfig:
    """What to train on and how.

    batch_size: transitions per GRPO update (SFT batches with sft.batch_size).
    epochs: passes over the data (for SFT it overrides sft.epochs).
    """

    algorithm: Literal["sft", "grpo"] = "sft"
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


@dataclass
class OfflineResult:
    rollouts: int
    transitions: int
    trained_transitions: int
    skipped: dict[str, int]
    metrics: list[dict[str, float]]
    adapter: str | None
    elapsed_s: float


def _skip_counts(skipped: Sequence[SkippedCall]) -> dict[str, int]:
    return dict(Counter(getattr(s.reason, "value", str(s.reason)) for s in skipped))


def select_training_data(traces: Sequence[Trace], config: OfflineConfig) -> tuple[list[Transition], list[Transition], dict[str, int]]:
    """(all transitions, the ones trained on, skip counts) for the configured algorithm."""
    transitions, skipped = build_batch(traces, agent_match=config.agent_match, credit=config.credit, merge=config.merge_turns)
    if config.algorithm == "sft":
        chosen = select_best(transitions, min_reward=config.min_reward, top_k=config.top_k)
    else:
        chosen = [t for t in transitions if t.advantage != 0.0]
    return transitions, chosen, _skip_counts(skipped)


def train_offline(traces: Sequence[Trace], out_dir: str | Path, config: OfflineConfig | None = None) -> OfflineResult:
    """Build transitions from stored traces, train (SFT or GRPO), save the adapter in out_dir/adapter."""
    from dataclasses import replace

    from agentkiln.algorithms.grpo import GRPOLearner
    from agentkiln.algorithms.sft import SFTLearner
    from agentkiln.engine.model_files import smollm2_dir

    config = config or OfflineConfig()
    started = time.monotonic()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    transitions, chosen, skipped = select_training_data(traces, config)
    log.info(
        "offline %s: %d rollouts -> %d transitions, %d to train on; left out: %s",
        config.algorithm, len(traces), len(transitions), len(chosen), skipped,
    )
    metrics: list[dict[str, float]] = []
    adapter: str | None = None
    if chosen:
        model_dir = config.model_dir or smollm2_dir()
        if config.algorithm == "sft":
            learner: Any = SFTLearner(model_dir, replace(config.sft, epochs=config.epochs))
            metrics.append(learner.update(chosen))
        else:
            learner = GRPOLearner(model_dir, replace(config.grpo, epochs=1))
            size = max(1, config.batch_size)
            for _ in range(max(1, config.epochs)):
                for i in range(0, len(chosen), size):
                    metrics.append(learner.update(chosen[i : i + size]))
        adapter = str(learner.save(out / ADAPTER_DIR))
    else:
        log.warning("offline %s: nothing to train on (no rollout passed the filter / all advantages 0)", config.algorithm)
    result = OfflineResult(
        rollouts=len(traces), transitions=len(transitions), trained_transitions=len(chosen), skipped=skipped,
        metrics=metrics, adapter=adapter, elapsed_s=round(time.monotonic() - started, 2),
    )
    (out / RESULT_FILE).write_text(json.dumps(asdict(result), indent=2))
    return result
