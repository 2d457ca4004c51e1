"""Built-in reward signals: what a rollout already records, turned into reward terms.

Each signal is a plain function of a rollout's records with its formula in its docstring:

* ``completion``   1 if the attempt succeeded and its own final reward (if any) is > 0, else 0.
* ``tool_success`` share of tool calls (`kiln.tool` spans) that did not fail, in [0, 1].
* ``latency``      mean over LLM calls of -min(1, max(0, latency - budget) / budget), in [-1, 0].
* ``feedback``     mean of users' feedback on the rollout, each normalised to [-1, 1]; 0 without any.
* ``failures``     -min(1, sum of the penalties of the failures recorded), in [-1, 0].

`RewardSignals` composes them with the user's reward (the agent's reward spans, as credit
assignment reads them): reward = user_weight * user_reward + sum_i weights[i] * signal_i. The
default (no weights, user_weight 1) changes nothing, and the transitions are built exactly as
without it. Why in the adapter: the algorithms (GRPO, SFT) see rewards only through
`build_batch`, so one place makes every algorithm train on the composed reward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentkiln.adapter.credit import RewardEvent, final_reward, reward_events
from agentkiln.models import Attempt, AttemptStatus, FailureKind, Feedback, Rollout, Span
from agentkiln.protocol import LLMCall, SpanAttrs, SpanNames, session_rollout_id

SIGNALS = ("completion", "tool_success", "latency", "feedback", "failures")
USER = "user"  # the key of the user's own reward in a weights mapping

# What each failure kind costs. The policy's own mistakes (malformed output, loops) cost most;
# failures it shares with its environment (tools, the model endpoint, time) less; a runner
# that stopped answering or a cancellation are nobody's answer, so they cost nothing.
DEFAULT_FAILURE_PENALTIES: dict[str, float] = {
    FailureKind.parse_error.value: 0.5,
    FailureKind.loop.value: 0.5,
    FailureKind.agent_exception.value: 0.25,
    FailureKind.tool_error.value: 0.25,
    FailureKind.tool_timeout.value: 0.25,
    FailureKind.timeout.value: 0.25,
    FailureKind.llm_error.value: 0.1,
    FailureKind.unresponsive.value: 0.0,
    FailureKind.cancelled.value: 0.0,
}
_TOOL_KINDS = (FailureKind.tool_error.value, FailureKind.tool_timeout.value)


# --------------------------------------------------------------------------- the signals


def task_completion(attempt: Attempt | None, spans: Iterable[Span]) -> float:
    """1.0 when `attempt` succeeded and the agent's own final reward (credit.final_reward of its
    reward spans), if it emitted one, is > 0; 0.0 when it failed, or scored itself <= 0."""
    if attempt is None or attempt.status != AttemptStatus.succeeded:
        return 0.0
    own = final_reward(reward_events(s for s in spans if s.attempt_id == attempt.attempt_id))
    return 1.0 if own is None or own > 0 else 0.0


def tool_failed(span: Span) -> bool:
    """A tool span failed when its status is ERROR or it names a failure kind (kiln.tool writes both)."""
    return span.status.code == "ERROR" or SpanAttrs.failure_kind in span.attributes


def tool_success(spans: Iterable[Span], attempt: Attempt | None = None) -> float:
    """ok / total over `kiln.tool` spans; 1.0 when no tool was called (nothing failed).

    An attempt that ended in a tool failure no tool span recorded (a tool not wrapped in
    kiln.tool) counts as one more failed call.
    """
    tools = [s for s in spans if s.name == SpanNames.tool]
    failed = sum(tool_failed(s) for s in tools)
    kind = attempt.error.kind.value if attempt is not None and attempt.error is not None else None
    if kind in _TOOL_KINDS and failed == 0:
        failed, total = 1, len(tools) + 1
    else:
        total = len(tools)
    return 1.0 if total == 0 else (total - failed) / total


def latency_penalty(spans: Iterable[Span], budget_s: float) -> float:
    """mean over LLM calls that recorded `kiln.llm.latency_s` of -min(1, max(0, latency - budget) / budget):
    0 within the budget, -1 at twice the budget or slower; 0.0 when no call recorded a latency."""
    penalties = []
    for span in spans:
        if span.name != SpanNames.llm_call:
            continue
        latency = LLMCall.from_span(span).latency_s
        if latency is not None and math.isfinite(latency):
            penalties.append(-min(1.0, max(0.0, latency - budget_s) / budget_s))
    return sum(penalties) / len(penalties) if penalties else 0.0


def feedback_score(value: Any, scale: tuple[float, float] = (0.0, 1.0)) -> float | None:
    """One feedback value in [-1, 1]: thumbs up/down +1/-1; a number v on scale (lo, hi) as
    2 * clip((v - lo) / (hi - lo), 0, 1) - 1; a category label None (not a score)."""
    if isinstance(value, bool):
        return 1.0 if value else -1.0
    if isinstance(value, (int, float)) and math.isfinite(value):
        lo, hi = scale
        return 2.0 * min(1.0, max(0.0, (value - lo) / (hi - lo))) - 1.0
    return None


def feedback_targets(fb: Feedback) -> set[str]:
    """The rollout ids a feedback record is about (its resolved rollout, the session's rollout)."""
    out = {fb.rollout_id} if fb.rollout_id is not None else set()
    if fb.session_id is not None:
        out.add(session_rollout_id(fb.session_id))
    return out


def feedback_of(rollout: Rollout, feedback: Iterable[Feedback]) -> list[Feedback]:
    """The feedback on `rollout`: on its calls or spans (resolved to it), or on the session it records."""
    return [fb for fb in feedback if rollout.rollout_id in feedback_targets(fb)]


def user_feedback(
    feedback: Iterable[Feedback], *, names: Sequence[str] | None = None, scale: tuple[float, float] = (0.0, 1.0)
) -> float:
    """mean of feedback_score over the given feedback (only `names`, if given); 0.0 without any
    (no judgement is neutral, not bad)."""
    scores = [
        score
        for fb in feedback
        if (names is None or fb.name in names) and (score := feedback_score(fb.value, scale)) is not None
    ]
    return sum(scores) / len(scores) if scores else 0.0


def failure_kinds(attempts: Iterable[Attempt], spans: Iterable[Span]) -> list[str]:
    """Failures recorded on a rollout: each attempt's error kind (a retried rollout keeps its failed
    attempts), each `kiln.exception` span's kind (handled exceptions), and `parse_error` for each
    LLM call whose tool call did not parse. Tool spans are tool_success's, not counted here."""
    kinds = [a.error.kind.value for a in attempts if a.error is not None]
    for span in spans:
        if span.name == SpanNames.exception and SpanAttrs.failure_kind in span.attributes:
            kinds.append(str(span.attributes[SpanAttrs.failure_kind]))
        elif span.name == SpanNames.llm_call and span.attributes.get(SpanAttrs.parse_error):
            kinds.append(FailureKind.parse_error.value)
    return kinds


def failure_penalty(kinds: Iterable[str], penalties: Mapping[str, float] = DEFAULT_FAILURE_PENALTIES) -> float:
    """-min(1, sum of penalties[kind] over the recorded failures) (an unknown kind costs 0)."""
    return -min(1.0, sum(penalties.get(kind, 0.0) for kind in kinds))


# --------------------------------------------------------------------------- composition


@dataclass(frozen=True)
class RolloutRecord:
    """What the signals read of one rollout: the attempt trained on, all attempts, that attempt's spans."""

    rollout: Rollout
    attempt: Attempt | None
    attempts: Sequence[Attempt]
    spans: Sequence[Span]
    feedback: Sequence[Feedback] = ()


@dataclass(frozen=True)
class RewardSignals:
    """Which built-in signals join the user's reward, and their parameters.

    weights: signal name (see SIGNALS) -> weight; a signal without a weight is not computed.
    user_weight: weight of the user's own reward (the agent's reward spans).
    latency_budget_s: per-call latency that costs nothing (`latency`).
    failure_penalties: failure kind -> cost (`failures`; DEFAULT_FAILURE_PENALTIES).
    feedback_names: feedback names that count (`feedback`; None: all).
    feedback_scale: (lo, hi) of numeric feedback (`feedback`; booleans are thumbs).
    """

    weights: Mapping[str, float] = field(default_factory=dict)
    user_weight: float = 1.0
    latency_budget_s: float = 10.0
    failure_penalties: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_FAILURE_PENALTIES))
    feedback_names: tuple[str, ...] | None = None
    feedback_scale: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.weights) - set(SIGNALS))
        if unknown:
            raise ValueError(f"unknown reward signal(s) {unknown}: use {', '.join(SIGNALS)} (or '{USER}' for your own)")
        if not all(math.isfinite(w) for w in (*self.weights.values(), self.user_weight)):
            raise ValueError("reward signal weights must be finite numbers")
        if not (math.isfinite(self.latency_budget_s) and self.latency_budget_s > 0):
            raise ValueError("latency_budget_s must be > 0")
        lo, hi = self.feedback_scale
        if not lo < hi:
            raise ValueError(f"feedback_scale must be (lo, hi) with lo < hi, got {self.feedback_scale}")

    @classmethod
    def of(cls, value: RewardSignals | Mapping[str, float] | None) -> RewardSignals | None:
        """From the short form: {"tool_success": 0.2, "latency": 0.1} (a "user" key sets user_weight)."""
        if value is None or isinstance(value, RewardSignals):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(
                f"reward_signals: a RewardSignals or a mapping of signal -> weight, got {type(value).__name__}"
            )
        weights = {str(k): float(v) for k, v in value.items()}
        return cls(weights={k: v for k, v in weights.items() if k != USER}, user_weight=weights.get(USER, 1.0))

    @property
    def enabled(self) -> bool:
        """False when composing would change nothing (the default)."""
        return self.user_weight != 1.0 or any(w != 0.0 for w in self.weights.values())

    def values(self, record: RolloutRecord) -> dict[str, float]:
        """Each weighted signal's value on `record`."""
        compute: dict[str, Callable[[], float]] = {
            "completion": lambda: task_completion(record.attempt, record.spans),
            "tool_success": lambda: tool_success(record.spans, record.attempt),
            "latency": lambda: latency_penalty(record.spans, self.latency_budget_s),
            "feedback": lambda: user_feedback(
                feedback_of(record.rollout, record.feedback), names=self.feedback_names, scale=self.feedback_scale
            ),
            "failures": lambda: failure_penalty(failure_kinds(record.attempts, record.spans), self.failure_penalties),
        }
        return {name: compute[name]() for name, w in self.weights.items() if w != 0.0}

    def bonus(self, record: RolloutRecord) -> float:
        """sum_i weights[i] * signal_i(record)."""
        values = self.values(record)
        return sum(self.weights[name] * value for name, value in values.items())

    def compose(self, events: Sequence[RewardEvent], record: RolloutRecord) -> list[RewardEvent]:
        """The user's reward events re-weighted so that credit assignment reads the composed reward.

        Every event is scaled by user_weight; the bonus is added to the last final event (so
        `final_reward` gives user_weight * R + bonus), or, when the agent emits only intermediate
        rewards, appended as one more intermediate event after every call (their sum, which
        `final_reward` reads then, gains the bonus; the last step's immediate reward takes it).
        """
        scaled = [RewardEvent(e.sequence_id, self.user_weight * e.value, e.final, e.name) for e in events]
        bonus = self.bonus(record)
        if bonus == 0.0 or not scaled:
            return scaled
        last_final = max((i for i, e in enumerate(scaled) if e.final), default=None)  # events are in order
        if last_final is not None:
            e = scaled[last_final]
            scaled[last_final] = RewardEvent(e.sequence_id, e.value + bonus, True, e.name)
            return scaled
        return [*scaled, RewardEvent(sequence_id=1 << 62, value=bonus, final=False, name="signals")]
