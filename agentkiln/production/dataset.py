"""Production sessions + users' feedback -> three training sets (SFT, DPO, off-policy GRPO) and a report.

Why one module reads all three: each set is a different view of the same rated calls, and the
report must say, for every call and every piece of feedback in the window, which set it went to
or why it was left out ("why did my deployed agent not learn" is answered from data).

Rules, stated once:

* Window: the `kiln.llm.call` spans of production sessions (rollouts of mode production) that
  started at or after `since`; the feedback read is all feedback on those sessions.
* Value -> reward: a bool is 1/0, a number is itself, a label goes through `DatasetConfig.labels`
  (case-insensitive; an unknown label is dropped as `unknown_label`). `names` keeps only feedback
  with those names. Per target the latest feedback counts (a user who changes a thumb); the
  earlier ones are `superseded`.
* Credit: feedback on a response (or its span) is the reward of that call; feedback on the
  session is the session's final reward, given to each of its calls without a rating of their
  own (the adapter's "final" credit: the outcome is broadcast to every call of the episode).
* SFT: rated calls with reward >= `min_reward`, as recorded (prompt and response token ids).
* DPO: (a) a correction: chosen = the correction as the model's own reply to the recorded prompt
  (`reply_ids`), rejected = the rated response (a correction on a session corrects its last call
  before the feedback); (b) two different answers to the same prompt (identical prompt ids) whose
  ratings differ by more than `pair_margin`, the higher one chosen, at most
  `max_pairs_per_prompt` pairs per prompt (largest rating gaps first).
* GRPO: rated calls with valid recorded log-probs. Calls sharing a prompt form a group
  (advantage = reward - group mean, over the group std); the rest share one baseline (reward -
  their mean, over their std). The recorded log-probs are the old policy of the clipped ratio;
  the trainer caps far-off-policy ratios (`GRPOConfig.max_importance_weight`).

Reading the store is `window.read_sessions`; the report's shape is `report.DatasetReport`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from agentkiln.adapter.credit import group_advantages
from agentkiln.adapter.transitions import SkipReason, _check_call
from agentkiln.algorithms.dpo.algorithm import PreferencePair
from agentkiln.models import Feedback, Span, Transition
from agentkiln.production.report import DatasetReport, Drop
from agentkiln.production.window import SessionData, read_sessions
from agentkiln.protocol import LLMCall
from agentkiln.store.base import Store

__all__ = [
    "DEFAULT_LABELS",
    "DatasetConfig",
    "DatasetReport",
    "Drop",
    "ProductionDataset",
    "SessionData",
    "build_dataset",
    "feedback_reward",
    "load_production_dataset",
    "read_sessions",
    "reply_ids",
]

log = logging.getLogger(__name__)

DEFAULT_LABELS: dict[str, float] = {
    "good": 1.0,
    "bad": 0.0,
    "thumbs_up": 1.0,
    "thumbs_down": 0.0,
    "up": 1.0,
    "down": 0.0,
}
CHATML_END = "<|im_end|>"
BASELINE_GROUP = "baseline"


@dataclass
class DatasetConfig:
    """Which feedback counts and how it becomes training data (see the module doc for the rules).

    names: feedback names to use (None: all).
    labels: category label -> reward (matched case-insensitively).
    min_reward: SFT keeps calls rated at least this.
    pair_margin: a rated DPO pair needs ratings further apart than this.
    agent_match: regex on the calling agent's name (None: every call).
    keep_truncated: keep calls that stopped at the token limit.
    scale_by_std / eps: GRPO advantages divided by the group std (+ eps), as `CreditConfig`.
    """

    names: tuple[str, ...] | None = None
    labels: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LABELS))
    min_reward: float = 1.0
    pair_margin: float = 0.0
    max_pairs_per_prompt: int = 8
    agent_match: str | None = None
    keep_truncated: bool = True
    scale_by_std: bool = True
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.max_pairs_per_prompt < 1:
            raise ValueError("max_pairs_per_prompt must be at least 1")
        if self.pair_margin < 0:
            raise ValueError("pair_margin must be >= 0")
        for label, value in self.labels.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"label {label!r} must map to a finite number, got {value!r}")
        if self.agent_match is not None:
            re.compile(self.agent_match)


@dataclass
class ProductionDataset:
    sft: list[Transition]
    dpo: list[PreferencePair]
    grpo: list[Transition]
    report: DatasetReport


# --------------------------------------------------------------------------- values and tokens


def feedback_reward(value: Any, labels: Mapping[str, float]) -> float | None:
    """A feedback value as a reward: bool 1/0, a finite number as is, a label by `labels`; None if unknown."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        wanted = value.strip().lower()
        for label, reward in labels.items():
            if label.strip().lower() == wanted:
                return float(reward)
    return None


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The token that ends an assistant turn: ChatML's `<|im_end|>` where the vocabulary has it (SmolLM2's
    template and `ChatMLTemplate`), else the tokenizer's EOS. The engine stops on it and records it as
    the last response token (engine/embedded/sampler.py `find_stop_ids`), so replies end with it."""
    tid = tokenizer.convert_tokens_to_ids(CHATML_END)
    if isinstance(tid, int) and tid != tokenizer.unk_token_id:
        return tid
    eos = tokenizer.eos_token_id
    return int(eos) if eos is not None else None


def reply_ids(tokenizer: Any, text: str) -> list[int]:
    """`text` as the model's own assistant reply, token for token as a recorded response looks.

    The text is tokenized the way the chat template tokenizes message text (special-token markup
    not parsed, so a correction typing `<|im_end|>` cannot forge a turn boundary), then the
    end-of-turn token is appended: a model trained on it learns to stop after the correction.
    """
    ids = list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    end = end_of_turn_id(tokenizer)
    return ids + ([end] if end is not None else [])


def grpo_skip_reason(span: Span, rec: LLMCall, keep_truncated: bool) -> SkipReason | None:
    """Why the adapter would leave this call out of a token-level update (no_logprobs, bad_logprobs,
    unreproducible_sampling, ...): its own per-call rules, applied to calls of sessions that never
    finish (so `build_transitions`, which wants a succeeded attempt, cannot read them)."""
    return _check_call(span, rec, None, keep_truncated)[1]


def prompt_key(prompt_ids: Sequence[int]) -> str:
    """A group id for calls that saw the very same prompt (token for token)."""
    blob = ",".join(map(str, prompt_ids)).encode()
    return "prompt-" + hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- building


@dataclass
class _Rated:
    """A call of the window with its reward (None: unrated), ready to become transitions."""

    session: str
    span: Span
    rec: LLMCall
    step: int
    last: bool
    reward: float | None = None
    unusable: Drop | None = None  # why its tokens cannot be trained on

    @property
    def key(self) -> str:
        return f"{self.session}/{self.span.span_id}"

    def transition(self, **extra: Any) -> Transition:
        rec = self.rec
        response = list(rec.response_ids or [])
        logprobs = rec.logprobs if rec.logprobs is not None and len(rec.logprobs) == len(response) else None
        values: dict[str, Any] = {
            "rollout_id": self.session,
            "attempt_id": self.span.attempt_id,
            "agent": rec.agent,
            "step": self.step,
            "prompt_ids": list(rec.prompt_ids or []),
            "response_ids": response,
            "logprobs": list(logprobs) if logprobs is not None else [0.0] * len(response),
            "response_mask": [1] * len(response),
            "reward": self.reward or 0.0,
            "return_": self.reward or 0.0,
            "done": self.last,
            "group_id": prompt_key(rec.prompt_ids or []),
            "model_version": rec.model_version,
            "temperature": rec.temperature,
            "top_p": rec.top_p,
        }
        values.update(extra)
        return Transition(**values)


def _unusable(rec: LLMCall, agent_re: re.Pattern[str] | None, keep_truncated: bool) -> Drop | None:
    if agent_re is not None and (rec.agent is None or agent_re.search(rec.agent) is None):
        return Drop.agent_not_selected
    if rec.redacted:
        return Drop.redacted
    if rec.prompt_ids is None or rec.response_ids is None:
        return Drop.no_token_ids
    if not rec.prompt_ids:
        return Drop.empty_prompt
    if not rec.response_ids:
        return Drop.empty_response
    if rec.finish_reason == "length" and not keep_truncated:
        return Drop.truncated
    return None


class _Correction(NamedTuple):
    call: _Rated | None
    feedback: Feedback


def _read_session(
    data: SessionData, config: DatasetConfig, report: DatasetReport, agent_re: re.Pattern[str] | None
) -> tuple[list[_Rated], list[_Correction]]:
    """The session's calls with their rewards, and its corrections, counting feedback as it goes."""
    rid = data.rollout.rollout_id
    calls = [
        _Rated(rid, span, LLMCall.from_span(span), step, step == len(data.calls) - 1)
        for step, span in enumerate(data.calls)
    ]
    for c in calls:
        c.unusable = _unusable(c.rec, agent_re, config.keep_truncated)
    by_span = {c.span.span_id: c for c in calls}
    by_call_id: dict[str, _Rated] = {}  # a response id names its first choice
    for c in calls:
        cid = c.rec.call_id
        if cid is not None and (cid not in by_call_id or c.rec.choice_index < by_call_id[cid].rec.choice_index):
            by_call_id[cid] = c

    session_key = "session"
    ratings: dict[str, tuple[float, Feedback]] = {}  # target key -> (reward, feedback in force)
    corrections: list[_Correction] = []
    used: set[str] = set()
    for fb in sorted(data.feedback, key=lambda f: (f.created_at, f.feedback_id)):
        if config.names is not None and fb.name not in config.names:
            report.feedback.drop(Drop.name_not_selected)
            continue
        if fb.response_id is None and fb.span_id is None:
            target: _Rated | None = None
            key = session_key
        else:
            target = by_span.get(fb.resolved_span_id or fb.span_id or "")
            if target is None and fb.response_id is not None:
                target = by_call_id.get(fb.response_id)
            if target is None:
                report.feedback.drop(Drop.call_not_in_window)
                continue
            key = target.key
        reward = feedback_reward(fb.value, config.labels)
        if fb.correction is not None:
            if target is None:  # on the session: it corrects the last call made before it
                earlier = [c for c in calls if c.span.start_time <= fb.created_at]
                target = earlier[-1] if earlier else calls[-1]
            corrections.append(_Correction(target, fb))
            used.add(fb.feedback_id)
        if reward is None:
            if fb.feedback_id not in used:
                report.feedback.drop(Drop.unknown_label)
            continue
        previous = ratings.get(key)
        if previous is not None and previous[1].feedback_id not in used:
            report.feedback.drop(Drop.superseded)
        ratings[key] = (reward, fb)

    used.update(fb.feedback_id for _, fb in ratings.values())
    report.feedback.used += len(used)
    session_reward = ratings.pop(session_key, None)
    for c in calls:
        own = ratings.get(c.key)
        if own is not None:
            c.reward = own[0]
        elif session_reward is not None:
            c.reward = session_reward[0]
    return calls, corrections


def _correction_pairs(
    corrections: Sequence[_Correction], tokenizer: Any, report: DatasetReport
) -> list[PreferencePair]:
    pairs: list[PreferencePair] = []
    for correction in corrections:
        call, fb = correction
        if call is None or call.unusable is not None:
            report.dpo.drop(call.unusable if call is not None else Drop.call_not_in_window)
            continue
        if not (fb.correction or "").strip():
            report.dpo.drop(Drop.empty_correction)
            continue
        if tokenizer is None:
            report.dpo.drop(Drop.no_tokenizer)
            continue
        chosen_ids = reply_ids(tokenizer, fb.correction or "")
        if chosen_ids == list(call.rec.response_ids or []):
            report.dpo.drop(Drop.correction_equals_response)
            continue
        rejected = call.transition()
        chosen = rejected.model_copy(
            update={
                "response_ids": chosen_ids,
                "logprobs": [0.0] * len(chosen_ids),
                "response_mask": [1] * len(chosen_ids),
                "model_version": None,
                "reward": 0.0,
                "return_": 0.0,
            }
        )
        pairs.append(PreferencePair(chosen=chosen, rejected=rejected, source="correction", feedback_id=fb.feedback_id))
    report.dpo.from_corrections = len(pairs)
    return pairs


def _rated_pairs(rated: Sequence[_Rated], config: DatasetConfig, report: DatasetReport) -> list[PreferencePair]:
    """Pairs of different answers to one prompt rated differently; the same answer rated twice counts once, at its mean."""
    by_prompt: dict[tuple[int, ...], dict[tuple[int, ...], list[_Rated]]] = {}
    for c in rated:
        by_prompt.setdefault(tuple(c.rec.prompt_ids or ()), {}).setdefault(tuple(c.rec.response_ids or ()), []).append(
            c
        )
    pairs: list[PreferencePair] = []
    for answers in by_prompt.values():
        scored = [(sum(c.reward or 0.0 for c in cs) / len(cs), cs[0]) for cs in answers.values()]
        candidates: list[tuple[float, _Rated, _Rated]] = []
        for i in range(len(scored)):
            for j in range(i + 1, len(scored)):
                (ri, ci), (rj, cj) = scored[i], scored[j]
                if abs(ri - rj) <= config.pair_margin:
                    report.dpo.drop(Drop.tie)
                    continue
                hi, lo = (ci, cj) if ri > rj else (cj, ci)
                candidates.append((abs(ri - rj), hi, lo))
        candidates.sort(key=lambda x: -x[0])  # stable: equal gaps keep their order
        for gap, hi, lo in candidates[: config.max_pairs_per_prompt]:
            pairs.append(PreferencePair(chosen=hi.transition(), rejected=lo.transition(), source="ratings"))
        if len(candidates) > config.max_pairs_per_prompt:
            report.dpo.drop(Drop.pair_cap, len(candidates) - config.max_pairs_per_prompt)
    report.dpo.from_ratings = len(pairs)
    return pairs


def _grpo(rated: Sequence[_Rated], config: DatasetConfig, report: DatasetReport) -> list[Transition]:
    kept: list[_Rated] = []
    for c in rated:
        reason = grpo_skip_reason(c.span, c.rec, config.keep_truncated)
        if reason is not None:
            report.grpo.drop(reason.value)
        else:
            kept.append(c)
    prompts = Counter(tuple(c.rec.prompt_ids or ()) for c in kept)
    groups = {
        c.key: prompt_key(c.rec.prompt_ids or []) if prompts[tuple(c.rec.prompt_ids or ())] > 1 else BASELINE_GROUP
        for c in kept
    }
    returns = {c.key: float(c.reward or 0.0) for c in kept}
    adv = group_advantages(returns, groups, scale_by_std=config.scale_by_std, eps=config.eps)
    out: list[Transition] = []
    for c in kept:
        a = adv.get(c.key, 0.0)
        if a == 0.0:
            report.grpo.drop(Drop.zero_advantage)
            continue
        out.append(c.transition(advantage=a, group_id=groups[c.key]))
    report.grpo.groups = len({g for g in groups.values() if g != BASELINE_GROUP})
    report.grpo.baseline = sum(1 for k, g in groups.items() if g == BASELINE_GROUP and adv.get(k, 0.0) != 0.0)
    return out


def build_dataset(
    sessions: Sequence[SessionData], since: float, config: DatasetConfig | None = None, tokenizer: Any = None
) -> ProductionDataset:
    """The three training sets and the report from sessions already read (`read_sessions`).

    tokenizer: the trained model's, to tokenize corrections (None: corrections are dropped as
    `no_tokenizer`); recorded prompts and responses are used as they are.
    """
    config = config or DatasetConfig()
    agent_re = re.compile(config.agent_match) if config.agent_match is not None else None
    report = DatasetReport(since=since, sessions=len(sessions))
    rated: list[_Rated] = []
    corrections: list[_Correction] = []
    for data in sessions:
        calls, fixes = _read_session(data, config, report, agent_re)
        corrections.extend(fixes)
        for c in calls:
            if c.reward is None:
                report.calls.drop(Drop.no_feedback)
            elif c.unusable is not None:
                report.calls.drop(c.unusable)
            else:
                rated.append(c)
    report.calls.used = len(rated)
    report.model_versions = dict(Counter(c.rec.model_version or "unknown" for c in rated))

    sft = [c.transition() for c in rated if (c.reward or 0.0) >= config.min_reward]
    report.sft.used = len(sft)
    if len(rated) > len(sft):
        report.sft.drop(Drop.below_threshold, len(rated) - len(sft))
    dpo = _correction_pairs(corrections, tokenizer, report) + _rated_pairs(rated, config, report)
    report.dpo.used = len(dpo)
    grpo = _grpo(rated, config, report)
    report.grpo.used = len(grpo)
    log.info(
        "production data since %s: %d sessions, %d rated calls -> sft %d, dpo %d, grpo %d; left out: calls %s,"
        " feedback %s",
        since,
        report.sessions,
        len(rated),
        len(sft),
        len(dpo),
        len(grpo),
        report.calls.dropped,
        report.feedback.dropped,
    )
    return ProductionDataset(sft=sft, dpo=dpo, grpo=grpo, report=report)


async def load_production_dataset(
    store: Store, since: float, config: DatasetConfig | None = None, tokenizer: Any = None
) -> ProductionDataset:
    """`read_sessions` then `build_dataset`."""
    return build_dataset(await read_sessions(store, since), since, config, tokenizer)
