"""Run a batch of tasks through the runners via the store and collect what came back."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from agentkiln.adapter.credit import final_reward, reward_events
from agentkiln.models import Attempt, AttemptStatus, Rollout, RolloutConfig, RolloutMode, Span
from agentkiln.store.base import Store

log = logging.getLogger(__name__)


@dataclass
class RolloutOutcome:
    rollout: Rollout
    attempts: list[Attempt]
    spans: list[Span]

    @property
    def succeeded_attempt(self) -> Optional[Attempt]:
        latest = self.attempts[-1] if self.attempts else None
        return latest if latest is not None and latest.status == AttemptStatus.succeeded else None

    @property
    def reward(self) -> float:
        """Final reward of the succeeded attempt; failed or reward-less rollouts score 0."""
        attempt = self.succeeded_attempt
        if attempt is None:
            return 0.0
        value = final_reward(reward_events(s for s in self.spans if s.attempt_id == attempt.attempt_id))
        return float(value) if value is not None else 0.0


async def run_rollouts(
    store: Store,
    tasks: Sequence[Any],
    *,
    mode: RolloutMode,
    resources_id: Optional[str],
    samples_per_task: int = 1,
    config: Optional[RolloutConfig] = None,
    group_prefix: str = "g",
    timeout: Optional[float] = None,
) -> list[RolloutOutcome]:
    """Enqueue every task `samples_per_task` times (one GRPO group per task) and wait for all of them."""
    items = [
        {
            "input": task,
            "mode": mode,
            "resources_id": resources_id,
            "config": config,
            "metadata": {"group_id": f"{group_prefix}-{i}", "sample": k},
        }
        for i, task in enumerate(tasks)
        for k in range(samples_per_task)
    ]
    rollouts = await store.enqueue_rollouts(items)
    ids = [r.rollout_id for r in rollouts]
    finished = {r.rollout_id: r for r in await store.wait_for_rollouts(ids, timeout=timeout)}
    unfinished = [rid for rid in ids if rid not in finished]
    for rid in unfinished:  # past the deadline: stop waiting, cancel so no runner keeps working on it
        log.warning("rollout %s did not finish in time; cancelling", rid)
        try:
            finished[rid] = await store.cancel_rollout(rid)
        except Exception:  # finished in the meantime
            finished[rid] = await store.get_rollout(rid)

    async def outcome(rid: str) -> RolloutOutcome:
        attempts, spans = await asyncio.gather(store.query_attempts(rid), store.query_spans(rid))
        return RolloutOutcome(rollout=finished[rid], attempts=attempts, spans=spans)

    # Independent reads: fetch them concurrently instead of 2 round trips per rollout in turn.
    return list(await asyncio.gather(*(outcome(rid) for rid in ids)))


def mean_reward(outcomes: Sequence[RolloutOutcome]) -> float:
    return sum(o.reward for o in outcomes) / len(outcomes) if outcomes else 0.0
