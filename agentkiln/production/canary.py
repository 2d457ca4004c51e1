"""A canary's evidence, its decision rule, and the decisions themselves (promote / roll back).

Statistics (the rule is `models.CanaryRule`'s docstring):

* A rating is a stored Feedback named `rule.metric`, created while the canary ran (after
  `started_at`, before `ended_at` if it ended). Booleans count 0/1, numbers as they are;
  category labels (strings) are not a metric and are left out.
* A rating counts toward the arm whose version served the rated call: `Feedback.model_version`
  "v<N>" or "<agent>@v<N>" (engine labels, see engine/weight_sync.py) with N the candidate's or
  the baseline's resources version. A rating without a version (session feedback, or a store that
  did not resolve one) or with another version goes by the session's sticky assignment
  (`assignment.variant`); another version on a candidate-assigned session was not served by the
  candidate (e.g. before its weights loaded) and is left out.
* The unit is the session: a session's ratings are averaged first, so a chatty session weighs one.
  Per arm: n = rated sessions, m = mean of the session means, s^2 = their sample variance (n - 1).
* The difference d = m_candidate - m_baseline has the two-sample normal-approximation interval
  d +- z * sqrt(s_c^2 / n_c + s_b^2 / n_b), z = Phi^-1((1 + confidence) / 2) (Welch's standard
  error; no pooling, since a candidate may change the spread too). Undefined while an arm has
  fewer than 2 rated sessions. With zero variance on both sides the interval is the point d: the
  rule's min_samples is what keeps such a verdict from resting on a handful of sessions.

Decisions race between replicas (each runs a CanaryController) and the `kiln canary` commands;
`Store.decide_canary` is the one atomic step (exactly one decider wins, the others get
InvalidTransitionError). So a promotion claims first and publishes after: deciding, then
publishing the deployed copy of the candidate. A loser therefore publishes nothing, and nothing
is ever deployed that a rollback decided against. The price: the claim cannot name the copy it
has not published yet, so the copy names its canary instead (metadata "canary_id"), and
`promoted_resources` finds it. A crash between the two steps leaves a promoted canary with no
copy, the safe side (the baseline keeps serving); the controller publishes it on its next pass.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import statistics
from collections import defaultdict
from typing import Any, Literal

from pydantic import BaseModel, Field

from agentkiln.models import Canary, CanaryDecision, CanaryStatus, Feedback, Resources, ResourcesIn, now
from agentkiln.production.assignment import BASELINE, CANDIDATE, variant
from agentkiln.protocol import session_rollout_id
from agentkiln.store.base import InvalidTransitionError, NotFoundError, Store, ValidationError

log = logging.getLogger(__name__)

PAGE = 1_000
PROMOTED_FROM = "promoted_from"  # metadata of a promoted copy: the candidate it copies
CANARY_ID = "canary_id"  # metadata of a promoted copy: the canary that promoted it
_VERSION = re.compile(r"^(?:.+@)?v(\d+)$")


class ArmStats(BaseModel):
    """One side of the comparison."""

    resources_id: str
    version: int | None = None
    n: int = Field(default=0, description="rated sessions")
    ratings: int = 0
    mean: float | None = Field(default=None, description="mean of the session means of the metric")
    variance: float | None = Field(default=None, description="sample variance of the session means (n - 1)")


class CanaryStats(BaseModel):
    """The evidence a canary is decided on (recorded with each decision)."""

    canary_id: str
    metric: str
    confidence: float
    baseline: ArmStats
    candidate: ArmStats
    difference: float | None = Field(default=None, description="candidate mean - baseline mean")
    std_error: float | None = None
    lower: float | None = Field(default=None, description="lower bound of the difference's interval")
    upper: float | None = None
    left_out: int = Field(default=0, description="ratings of the metric that no arm could claim")
    promoted_resources_id: str | None = Field(default=None, description="the deployed copy, once promoted")
    computed_at: float = Field(default_factory=now)


# --------------------------------------------------------------------------- statistics


def served_version(model_version: str | None) -> int | None:
    """The resources version an engine label names: "v3" and "agent@v3" -> 3; else None."""
    match = _VERSION.match(model_version or "")
    return int(match.group(1)) if match else None


def rating_value(value: Any) -> float | None:
    """A feedback value as a number: booleans 0/1, finite numbers as they are; labels None."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def arm_summary(arm: ArmStats, session_means: list[float]) -> ArmStats:
    n = len(session_means)
    return arm.model_copy(
        update={
            "n": n,
            "mean": statistics.fmean(session_means) if n else None,
            "variance": statistics.variance(session_means) if n >= 2 else None,
        }
    )


def difference_interval(
    baseline: ArmStats, candidate: ArmStats, confidence: float
) -> tuple[float | None, float | None, float | None, float | None]:
    """(d, standard error, lower, upper) of candidate - baseline; Nones while an arm has < 2 sessions."""
    if baseline.mean is None or candidate.mean is None:
        return None, None, None, None
    d = candidate.mean - baseline.mean
    if baseline.variance is None or candidate.variance is None:
        return d, None, None, None
    se = math.sqrt(candidate.variance / candidate.n + baseline.variance / baseline.n)
    z = statistics.NormalDist().inv_cdf((1.0 + confidence) / 2.0)
    return d, se, d - z * se, d + z * se


async def _ratings(store: Store, canary: Canary) -> list[Feedback]:
    """Feedback named `rule.metric` created while the canary ran, oldest first."""
    out: list[Feedback] = []
    offset = 0
    while True:
        page = await store.query_feedback(since=canary.started_at, limit=PAGE, offset=offset)
        out.extend(
            fb
            for fb in page
            if fb.name == canary.rule.metric
            and fb.created_at >= canary.started_at
            and (canary.ended_at is None or fb.created_at <= canary.ended_at)
        )
        if len(page) < PAGE:
            return out
        offset += PAGE


def _session_key(fb: Feedback) -> str | None:
    """The rollout recording the rated session (a session's ratings are averaged under it)."""
    if fb.rollout_id is not None:
        return fb.rollout_id
    return session_rollout_id(fb.session_id) if fb.session_id is not None else None


async def _session_ids(store: Store, rollout_ids: set[str]) -> dict[str, str]:
    """Rollout id -> the session id it records (production rollouts' input holds it)."""
    out: dict[str, str] = {}
    ids = sorted(rollout_ids)
    for start in range(0, len(ids), PAGE):
        for rollout in await store.query_rollouts(rollout_ids=ids[start : start + PAGE], limit=PAGE):
            session = rollout.input.get("session_id") if isinstance(rollout.input, dict) else None
            if isinstance(session, str):
                out[rollout.rollout_id] = session
    return out


def choose_arm(
    canary: Canary, model_version: str | None, session_id: str | None, versions: tuple[int | None, int | None]
) -> str | None:
    """CANDIDATE, BASELINE or None (left out) for one rating; see the module docstring."""
    candidate_version, baseline_version = versions
    served = served_version(model_version)
    if served is not None and served == candidate_version:
        return CANDIDATE
    if served is not None and served == baseline_version:
        return BASELINE
    if session_id is None:
        return None
    # The assignment as it was while the canary ran (variant() answers baseline for an ended canary).
    assigned = variant(canary.model_copy(update={"status": CanaryStatus.active}), session_id)
    if model_version is not None and assigned == CANDIDATE:
        return None  # served by some other version although assigned to the candidate
    return assigned


async def _version_of(store: Store, resources_id: str) -> int | None:
    try:
        return (await store.get_resources(resources_id)).version
    except NotFoundError:
        return None


async def canary_stats(store: Store, canary: Canary) -> CanaryStats:
    """The per-arm means and the difference's interval of `canary` from the store's feedback now."""
    versions = (
        await _version_of(store, canary.candidate_resources_id),
        await _version_of(store, canary.baseline_resources_id),
    )
    ratings = await _ratings(store, canary)
    unknown = {key for fb in ratings if fb.session_id is None and (key := _session_key(fb)) is not None}
    sessions = await _session_ids(store, unknown) if unknown else {}
    per_session: dict[str, dict[str, list[float]]] = {CANDIDATE: defaultdict(list), BASELINE: defaultdict(list)}
    counts = {CANDIDATE: 0, BASELINE: 0}
    left_out = 0
    for fb in ratings:
        value, key = rating_value(fb.value), _session_key(fb)
        if value is None:  # a category label is not a value of the metric
            continue
        arm = choose_arm(canary, fb.model_version, fb.session_id or sessions.get(key), versions) if key else None
        if arm is None or key is None:
            left_out += 1
            continue
        per_session[arm][key].append(value)
        counts[arm] += 1

    def arm(name: str, resources_id: str, version: int | None) -> ArmStats:
        means = [statistics.fmean(values) for values in per_session[name].values()]
        return arm_summary(ArmStats(resources_id=resources_id, version=version, ratings=counts[name]), means)

    candidate = arm(CANDIDATE, canary.candidate_resources_id, versions[0])
    baseline = arm(BASELINE, canary.baseline_resources_id, versions[1])
    d, se, lower, upper = difference_interval(baseline, candidate, canary.rule.confidence)
    promoted = await promoted_resources(store, canary) if canary.status == CanaryStatus.promoted else None
    return CanaryStats(
        canary_id=canary.canary_id, metric=canary.rule.metric, confidence=canary.rule.confidence,
        baseline=baseline, candidate=candidate, difference=d, std_error=se, lower=lower, upper=upper,
        left_out=left_out, promoted_resources_id=promoted.resources_id if promoted is not None else None,
    )  # fmt: skip


# --------------------------------------------------------------------------- the rule


def _decision(action: Literal["promote", "rollback"], reason: str, stats: CanaryStats) -> CanaryDecision:
    return CanaryDecision(action=action, by="rule", reason=reason, stats=stats.model_dump(mode="json"))


def evaluate(canary: Canary, stats: CanaryStats) -> CanaryDecision | None:
    """The rule's verdict on `stats` (models.CanaryRule), or None to keep collecting.

    Pure: whether the rule may act by itself (`rule.auto`) is the caller's business. Both
    verdicts need `min_samples` rated sessions on each arm and a defined interval:
    rollback when upper < -max_regression, promote when lower > -max_regression (strict, so with
    max_regression 0 a tie is never promoted: it must show it is not worse). Once each arm has
    `max_samples` with neither, rollback: no evidence the candidate is as good.
    """
    if canary.status != CanaryStatus.active:
        return None
    rule = canary.rule
    n = min(stats.baseline.n, stats.candidate.n)
    margin = -rule.max_regression
    if n >= rule.min_samples and stats.lower is not None and stats.upper is not None:
        interval = f"difference {stats.difference:+.4f}, {rule.confidence:.0%} interval [{stats.lower:+.4f}, {stats.upper:+.4f}]"
        if stats.upper < margin:
            return _decision("rollback", f"candidate worse: {interval} below {margin:+.4f}", stats)
        if stats.lower > margin:
            return _decision("promote", f"candidate not worse: {interval} above {margin:+.4f}", stats)
    if n >= rule.max_samples:
        return _decision(
            "rollback", f"no verdict after {n} rated sessions per version (max_samples {rule.max_samples})", stats
        )
    return None


# --------------------------------------------------------------------------- decisions


def _stats_dump(stats: CanaryStats | None) -> dict[str, Any]:
    return stats.model_dump(mode="json") if stats is not None else {}


async def candidate_of(store: Store, canary: Canary) -> Resources:
    """The canary's candidate resources: NotFoundError if gone, ValidationError if not a candidate."""
    candidate = await store.get_resources(canary.candidate_resources_id)
    if not candidate.candidate:
        raise ValidationError(
            f"resources {candidate.resources_id} (v{candidate.version}) is not a candidate version: "
            "it is deployed already, so there is nothing to promote"
        )
    return candidate


def check_active(canary: Canary) -> None:
    if canary.status != CanaryStatus.active:
        raise InvalidTransitionError(f"canary {canary.canary_id} is already {canary.status.value}")


async def promoted_resources(store: Store, canary: Canary) -> Resources | None:
    """The deployed copy a promotion of `canary` published (None: not promoted, or not published yet)."""
    if canary.status != CanaryStatus.promoted:
        return None
    if canary.promoted_resources_id is not None:
        return await store.get_resources(canary.promoted_resources_id)
    offset = 0
    while True:
        page = await store.query_resources(limit=PAGE, offset=offset)
        for res in page:
            if not res.candidate and res.metadata.get(CANARY_ID) == canary.canary_id:
                return res
        if len(page) < PAGE:
            return None
        offset += PAGE


async def publish_promotion(store: Store, canary: Canary, candidate: Resources, *, tries: int = 3) -> Resources:
    """Publish the deployed copy of a promoted canary's candidate (retried: the claim is already made)."""
    copy = ResourcesIn(
        llms=candidate.llms,
        prompts=candidate.prompts,
        metadata={**candidate.metadata, PROMOTED_FROM: candidate.resources_id, CANARY_ID: canary.canary_id},
        candidate=False,
    )
    for attempt in range(tries):
        try:
            published = await store.add_resources(copy)
            log.info(
                "canary %s: promoted candidate v%d as deployed version v%d (%s)",
                canary.canary_id, candidate.version, published.version, published.resources_id,
            )  # fmt: skip
            return published
        except Exception:
            if attempt == tries - 1:
                raise
            log.warning("canary %s: publishing the promoted version failed; retrying", canary.canary_id, exc_info=True)
            await asyncio.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


async def promote(
    store: Store, canary: Canary, *, by: Literal["rule", "user"] = "user", reason: str = "",
    stats: CanaryStats | None = None,
) -> Canary:  # fmt: skip
    """Promote `canary`: claim the decision, then publish the candidate as the deployed version.

    InvalidTransitionError when the canary is no longer active (another decider won: nothing is
    published); NotFoundError / ValidationError when its candidate is gone / not a candidate.
    Returns the decided canary, `promoted_resources_id` naming the published copy.
    """
    check_active(canary)
    candidate = await candidate_of(store, canary)
    decision = CanaryDecision(action="promote", by=by, reason=reason, stats=_stats_dump(stats))
    decided = await store.decide_canary(canary.canary_id, decision)  # the claim: one decider gets past it
    published = await publish_promotion(store, decided, candidate)
    return decided.model_copy(update={"promoted_resources_id": published.resources_id})


async def rollback(
    store: Store, canary: Canary, *, by: Literal["rule", "user"] = "user", reason: str = "",
    stats: CanaryStats | None = None,
) -> Canary:  # fmt: skip
    """Roll `canary` back: the candidate stops serving; nothing is published (the baseline is deployed)."""
    check_active(canary)
    decided = await store.decide_canary(
        canary.canary_id, CanaryDecision(action="rollback", by=by, reason=reason, stats=_stats_dump(stats))
    )
    log.info("canary %s rolled back by %s: %s", canary.canary_id, by, reason)
    return decided


async def with_promoted(store: Store, canary: Canary) -> Canary:
    """`canary` with `promoted_resources_id` filled in from its published copy where the record lacks it."""
    if canary.status != CanaryStatus.promoted or canary.promoted_resources_id is not None:
        return canary
    published = await promoted_resources(store, canary)
    return canary.model_copy(update={"promoted_resources_id": published.resources_id}) if published else canary


async def finish_promotion(store: Store, canary: Canary) -> Resources | None:
    """Publish the copy of a promoted canary whose promotion stopped between claim and publish.

    Only the latest canary is repaired (an older promotion was superseded by later versions).
    """
    if canary.status != CanaryStatus.promoted or await promoted_resources(store, canary) is not None:
        return None
    log.warning("canary %s was promoted but its version was not published; publishing it now", canary.canary_id)
    return await publish_promotion(store, canary, await store.get_resources(canary.candidate_resources_id))


# --------------------------------------------------------------------------- the controller


class CanaryController:
    """Decides the active canary by its rule, every `interval_s` (the server runs one per replica).

    Replicas race harmlessly: `promote`/`rollback` lose with InvalidTransitionError when another
    replica or a user decided first. `last_stats` holds the latest evidence looked at.
    """

    def __init__(self, store: Store, interval_s: float = 5.0) -> None:
        self.store = store
        self.interval_s = interval_s
        self.last_stats: CanaryStats | None = None
        self.last_error: str | None = None
        self._settled: set[str] = set()  # ended canaries whose promotion is known to be published

    async def step(self) -> Canary | None:
        """One pass; returns the canary if this pass decided it."""
        canary = await self.store.get_active_canary()
        if canary is None:
            await self._settle_latest()
            return None
        stats = await canary_stats(self.store, canary)
        self.last_stats = stats
        if not canary.rule.auto:
            return None
        decision = evaluate(canary, stats)
        if decision is None:
            return None
        act = promote if decision.action == "promote" else rollback
        try:
            decided = await act(self.store, canary, by="rule", reason=decision.reason, stats=stats)
        except InvalidTransitionError:
            log.info("canary %s was decided elsewhere meanwhile", canary.canary_id)
            return None
        log.info("canary %s: %s by the rule (%s)", canary.canary_id, decision.action, decision.reason)
        self._settled.add(canary.canary_id)
        return decided

    async def _settle_latest(self) -> None:
        latest = await self.store.query_canaries(limit=1)
        if not latest or latest[0].canary_id in self._settled:
            return
        await finish_promotion(self.store, latest[0])
        self._settled.add(latest[0].canary_id)

    async def run_forever(self) -> None:
        while True:
            try:
                await self.step()
                self.last_error = None
            except asyncio.CancelledError:
                raise
            except NotImplementedError:  # a store without canaries: nothing to decide
                pass
            except Exception as exc:  # a failing pass must not stop the next one
                if str(exc) != self.last_error:
                    log.exception("canary controller pass failed")
                self.last_error = str(exc)
            await asyncio.sleep(self.interval_s)
