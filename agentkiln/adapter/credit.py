"""Credit assignment: turn a rollout's rewards into per-transition returns and advantages.

Two return modes:

* ``final``: the rollout's final reward is broadcast to every transition (every LLM call
  of the episode shares the outcome; the usual choice for GRPO on agents).
* ``discounted``: each intermediate reward belongs to the LLM call that precedes it in
  sequence order, the final reward to the last call, and every transition gets the
  return-to-go ``G_t = r_t + gamma * G_{t+1}``.

The GRPO advantage is computed ONCE per rollout from the rollout's return, normalised
within its group (rollouts of the same task), and copied to all of that rollout's
transitions. Normalising per transition instead would let a rollout with 20 LLM calls
weigh 20 times more in the group statistics than one with a single call.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from agentkiln.models import Rollout, Span, Transition
from agentkiln.protocol import SpanAttrs, SpanNames

CreditMode = Literal["final", "discounted"]


@dataclass(frozen=True)
class CreditConfig:
    """How rewards become returns and advantages.

    mode: ``final`` (broadcast) or ``discounted`` (return-to-go with ``gamma``).
    reward_name: only reward spans with this name count (None = all; spans without a name are "primary").
    missing_reward: return used when a rollout has no reward span; None drops the rollout from training.
    scale_by_std: divide the group-centred return by the group std (False = Dr. GRPO style, mean only).
    eps: added to the std so a group of identical returns gives advantage 0, not NaN.
    """

    mode: CreditMode = "final"
    gamma: float = 1.0
    reward_name: str | None = None
    missing_reward: float | None = 0.0
    scale_by_std: bool = True
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.mode not in ("final", "discounted"):
            raise ValueError(f"unknown credit mode {self.mode!r}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError("gamma must be in [0, 1]")


@dataclass(frozen=True)
class RewardEvent:
    """One reward span reduced to what credit assignment needs."""

    sequence_id: int
    value: float
    final: bool
    name: str = "primary"


def reward_events(spans: Iterable[Span], reward_name: str | None = None) -> list[RewardEvent]:
    """Reward spans (of one attempt) in sequence order, filtered by name; non-finite values are dropped."""
    events: list[RewardEvent] = []
    for span in spans:
        if span.name != SpanNames.reward:
            continue
        attrs = span.attributes
        name = attrs.get(SpanAttrs.reward_name) or "primary"
        if reward_name is not None and name != reward_name:
            continue
        try:
            value = float(attrs.get(SpanAttrs.reward_value))
        except (TypeError, ValueError):
            continue
        if not math.isfinite(value):
            continue
        events.append(RewardEvent(span.sequence_id, value, bool(attrs.get(SpanAttrs.reward_final, False)), name))
    events.sort(key=lambda e: e.sequence_id)
    return events


def final_reward(events: Sequence[RewardEvent]) -> float | None:
    """The last final-flagged reward; an agent that only emits intermediate rewards is scored by their sum."""
    finals = [e.value for e in events if e.final]
    if finals:
        return finals[-1]
    if events:
        return sum(e.value for e in events)
    return None


def step_rewards(call_sequence_ids: Sequence[int], events: Sequence[RewardEvent]) -> list[float]:
    """Immediate reward of each step (steps given by the sequence id of their first LLM call, ascending).

    An intermediate reward goes to the latest step whose call precedes it (one emitted before any
    call goes to the first step); final rewards go to the last step. Only the last final reward
    counts, so a re-emitted final score is not double counted.
    """
    n = len(call_sequence_ids)
    rewards = [0.0] * n
    if n == 0:
        return rewards
    finals = [e for e in events if e.final]
    for event in events:
        if event.final:
            continue
        idx = 0
        for i, seq in enumerate(call_sequence_ids):
            if seq < event.sequence_id:
                idx = i
            else:
                break
        rewards[idx] += event.value
    if finals:
        rewards[-1] += finals[-1].value
    return rewards


def returns_to_go(rewards: Sequence[float], gamma: float) -> list[float]:
    """G_t = r_t + gamma * G_{t+1}, computed backwards."""
    out = [0.0] * len(rewards)
    running = 0.0
    for i in range(len(rewards) - 1, -1, -1):
        running = rewards[i] + gamma * running
        out[i] = running
    return out


def group_key(rollout: Rollout) -> str:
    """Task key shared by the rollouts GRPO compares: metadata["group_id"], else a hash of the input."""
    gid = rollout.metadata.get("group_id") if rollout.metadata else None
    if gid is not None:
        return str(gid)
    blob = json.dumps(rollout.input, sort_keys=True, default=str, ensure_ascii=False)
    return "input-" + hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def group_advantages(
    returns: Mapping[str, float],
    groups: Mapping[str, str],
    *,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> dict[str, float]:
    """A = (R - mean(group)) / (std(group) + eps) per rollout id (population std; a lone rollout gets 0)."""
    members: dict[str, list[str]] = {}
    for rid in returns:
        members.setdefault(groups.get(rid, rid), []).append(rid)
    adv: dict[str, float] = {}
    for rids in members.values():
        values = [returns[r] for r in rids]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        for rid, value in zip(rids, values):
            centred = value - mean
            adv[rid] = centred / (std + eps) if scale_by_std else centred
    return adv


def assign_advantages(results: Iterable[Any], config: CreditConfig | None = None) -> list[Transition]:
    """Set `advantage` on every transition of the given adapter results; returns all their transitions.

    `results` are `AdapterResult`s (anything with rollout_id, group_id, rollout_return, transitions).
    Rollouts without a return (dropped for a missing reward) take no part in the group statistics.
    A rollout whose LLM calls were all skipped still counts in its group's mean and std, since its
    outcome is a sample of the task's reward all the same.
    """
    config = config or CreditConfig()
    results = list(results)
    returns = {r.rollout_id: r.rollout_return for r in results if r.rollout_return is not None}
    groups = {r.rollout_id: r.group_id for r in results}
    adv = group_advantages(returns, groups, scale_by_std=config.scale_by_std, eps=config.eps)
    out: list[Transition] = []
    for r in results:
        for t in r.transitions:
            t.advantage = adv.get(r.rollout_id, 0.0)
            out.append(t)
    return out
