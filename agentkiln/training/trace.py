"""A finished rollout as training reads it, and the two ways to get them: run tasks, or read a store.

`Trace` is the one record of a finished rollout (the rollout, its attempts, its spans) with
the one definition of its latest attempt and its reward. It is a NamedTuple so the adapter's
`build_batch`, which takes (rollout, attempts, spans) triples, consumes traces as they are.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any, NamedTuple

from agentkiln.adapter.credit import final_reward, reward_events
from agentkiln.adapter.transitions import latest_attempt
from agentkiln.models import Attempt, AttemptStatus, Rollout, RolloutConfig, RolloutMode, RolloutStatus, Span
from agentkiln.protocol import SpanAttrs, SpanNames
from agentkiln.store.base import Store

log = logging.getLogger(__name__)

PAGE = 500


class Trace(NamedTuple):
    rollout: Rollout
    attempts: list[Attempt]
    spans: list[Span]

    @property
    def latest_attempt(self) -> Attempt | None:
        """The rollout's most recent attempt: the adapter's rule, so training and its data agree."""
        return latest_attempt(self.rollout, self.attempts)

    @property
    def succeeded_attempt(self) -> Attempt | None:
        latest = self.latest_attempt
        return latest if latest is not None and latest.status == AttemptStatus.succeeded else None

    def latest_spans(self) -> list[Span]:
        """Spans of the latest attempt (all spans when there is no attempt)."""
        latest = self.latest_attempt
        return [s for s in self.spans if latest is None or s.attempt_id == latest.attempt_id]

    @property
    def reward(self) -> float:
        """Final reward of the succeeded attempt; failed or reward-less rollouts score 0."""
        return self.reward_named(None)

    def reward_named(self, name: str | None) -> float:
        """Final reward of the succeeded attempt among the reward spans called `name` (None: all of
        them, as credit assignment reads them); failed rollouts and rollouts without one score 0."""
        attempt = self.succeeded_attempt
        if attempt is None:
            return 0.0
        value = final_reward(reward_events((s for s in self.spans if s.attempt_id == attempt.attempt_id), name))
        return float(value) if value is not None else 0.0

    def reward_names(self) -> set[str]:
        """Names of the rewards the succeeded attempt emitted ("primary" for unnamed ones)."""
        attempt = self.succeeded_attempt
        if attempt is None:
            return set()
        return {e.name for e in reward_events(s for s in self.spans if s.attempt_id == attempt.attempt_id)}


def skip_counts(skipped: Sequence[Any]) -> dict[str, int]:
    """How many LLM calls the adapter left out, by reason (SkippedCall.reason)."""
    return dict(Counter(getattr(s.reason, "value", str(s.reason)) for s in skipped))


def sampled_tokens(traces: Sequence[Trace]) -> int:
    """Response tokens the engine generated for these rollouts' latest attempts (sampling throughput)."""
    return sum(
        len(s.attributes.get(SpanAttrs.response_token_ids) or ())
        for t in traces
        for s in t.latest_spans()
        if s.name == SpanNames.llm_call
    )


def mean_reward(traces: Sequence[Any], name: str | None = None) -> float:
    """Mean final reward (of the rewards called `name`; None: the rollout's reward) over `traces`."""
    if not traces:
        return 0.0
    return sum(t.reward if name is None else t.reward_named(name) for t in traces) / len(traces)


def named_rewards(traces: Sequence[Trace]) -> dict[str, float]:
    """Mean of each named reward besides "primary" (e.g. each agent's share of a multi-agent
    program's score) over `traces`; a rollout that did not emit one counts 0 for it."""
    names = sorted(set().union(*(t.reward_names() for t in traces)) - {"primary"}) if traces else []
    return {name: mean_reward(traces, name) for name in names}


async def _trace(store: Store, rollout: Rollout) -> Trace:
    attempts, spans = await asyncio.gather(
        store.query_attempts(rollout.rollout_id), store.query_spans(rollout.rollout_id)
    )
    return Trace(rollout, attempts, spans)


async def run_rollouts(
    store: Store,
    tasks: Sequence[Any],
    *,
    mode: RolloutMode,
    resources_id: str | None,
    samples_per_task: int = 1,
    config: RolloutConfig | None = None,
    group_prefix: str = "g",
    timeout: float | None = None,
) -> list[Trace]:
    """Enqueue every task `samples_per_task` times (one GRPO group per task, contiguous in the
    result) and wait for all of them."""
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
    for rid in [rid for rid in ids if rid not in finished]:  # past the deadline: cancel so no runner keeps at it
        log.warning("rollout %s did not finish in time; cancelling", rid)
        try:
            finished[rid] = await store.cancel_rollout(rid)
        except Exception:  # finished in the meantime
            finished[rid] = await store.get_rollout(rid)
    # Independent reads: fetch them concurrently instead of 2 round trips per rollout in turn.
    return list(await asyncio.gather(*(_trace(store, finished[rid]) for rid in ids)))


async def load_traces(store: Store, *, mode: str | None = None, limit: int | None = None) -> list[Trace]:
    """Finished rollouts, oldest first (failed ones too: the adapter reports why they are left out)."""
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
            out.append(await _trace(store, rollout))
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
