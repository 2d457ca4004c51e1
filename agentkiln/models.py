"""Wire data shared by every part of AgentKiln (store, server, gateway, runner, adapter, trainer).

Everything that crosses a process boundary is one of these pydantic models, so the
HTTP API, the SQLite rows and the in-memory store all agree on one shape.
"""

from __future__ import annotations

import functools
import string
import time
import uuid
from enum import Enum
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, StrictBool, field_validator, model_validator

from agentkiln.protocol import AGENT_NAME_PATTERN

# Upper bounds that keep one bad client from filling the store or the server's memory.
MAX_INPUT_BYTES = 1_000_000
MAX_ATTRIBUTES_BYTES = 4_000_000
MAX_NAME_LENGTH = 512
# Counts (which the OpenAPI states, so clients and fuzzers see them) well above real use.
MAX_KEYS = 1_000  # attributes of a span or event, metadata keys, llms/prompts of one resources version
MAX_EVENTS = 1_000  # events of one span
MAX_PROMPT_LENGTH = 1_000_000


# The largest page offset any store accepts (SQLite integers are 64-bit; no store holds more rows).
MAX_OFFSET = 2**62


def _json_int(value: Any) -> Any:
    if isinstance(value, (bool, str)):  # JSON true and "3" are not integers, whatever pydantic's lax mode says
        raise ValueError("an integer is required")
    return value


# A finite float that JSON booleans and strings do not pass for (pydantic's lax mode would turn
# false into 0.0 and "1.5" into 1.5). Strict rather than a validator, so that constraints such as
# gt=0 still reach the JSON schema as exclusiveMinimum.
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
# An integer as JSON Schema means it: 3 and 3.0, not true or "3".
Integer = Annotated[int, BeforeValidator(_json_int)]


def new_id(prefix: str) -> str:
    """Readable, sortable-enough unique ids (prefix tells the kind in logs)."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def now() -> float:
    return time.time()


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=False)


# --------------------------------------------------------------------------- enums


class RolloutStatus(str, Enum):
    queuing = "queuing"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    requeuing = "requeuing"

    @property
    def finished(self) -> bool:
        return self in (RolloutStatus.succeeded, RolloutStatus.failed, RolloutStatus.cancelled)

    @property
    def waiting(self) -> bool:
        """Can be handed to a runner by dequeue."""
        return self in (RolloutStatus.queuing, RolloutStatus.requeuing)


class AttemptStatus(str, Enum):
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    timeout = "timeout"
    unresponsive = "unresponsive"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        # unresponsive is not final: a late heartbeat/span can revive the attempt.
        return self in (
            AttemptStatus.succeeded,
            AttemptStatus.failed,
            AttemptStatus.timeout,
            AttemptStatus.cancelled,
        )


class FailureKind(str, Enum):
    """Why an attempt failed; drives retry policy, dashboards and reward penalties."""

    agent_exception = "agent_exception"
    tool_error = "tool_error"
    tool_timeout = "tool_timeout"
    llm_error = "llm_error"
    parse_error = "parse_error"
    loop = "loop"
    timeout = "timeout"
    unresponsive = "unresponsive"
    cancelled = "cancelled"


class RolloutMode(str, Enum):
    train = "train"
    val = "val"
    test = "test"
    production = "production"  # a deployed agent's session, recorded on plain /v1 (agentkiln/production)


# --------------------------------------------------------------------------- rollouts & attempts


class RolloutConfig(_Wire):
    timeout_s: Optional[Number] = Field(default=None, gt=0, description="wall-clock limit of one attempt")
    unresponsive_s: Optional[Number] = Field(
        default=None, gt=0, description="an attempt with no heartbeat/span for this long is unresponsive"
    )
    max_attempts: Integer = Field(default=1, ge=1, le=100)
    retry_on: list[FailureKind] = Field(
        default_factory=list, description="failure kinds that requeue the rollout (while attempts remain)"
    )


class AttemptError(_Wire):
    kind: FailureKind
    message: str = ""
    type: Optional[str] = Field(default=None, description="exception class name")
    stack: Optional[str] = None


class Rollout(_Wire):
    rollout_id: str
    input: Any = None
    mode: Optional[RolloutMode] = None
    status: RolloutStatus = RolloutStatus.queuing
    resources_id: Optional[str] = None
    config: RolloutConfig = Field(default_factory=RolloutConfig)
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: float = Field(default_factory=now)
    start_time: Optional[float] = None
    end_time: Optional[float] = None
    num_attempts: int = 0


class Attempt(_Wire):
    attempt_id: str
    rollout_id: str
    sequence_id: int = Field(description="1 for the first attempt of a rollout, 2 for its first retry, ...")
    worker_id: Optional[str] = None
    status: AttemptStatus = AttemptStatus.running
    start_time: float = Field(default_factory=now)
    end_time: Optional[float] = None
    last_heartbeat: float = Field(default_factory=now)
    error: Optional[AttemptError] = None


class AttemptedRollout(_Wire):
    """What dequeue hands a runner: the rollout and the attempt it now owns."""

    rollout: Rollout
    attempt: Attempt
    token: Optional[str] = Field(
        default=None,
        repr=False,  # never in logs
        description="The attempt's credential for its agent (gateway calls, its own spans); set by the server",
    )


# --------------------------------------------------------------------------- spans


class SpanStatus(_Wire):
    code: Literal["UNSET", "OK", "ERROR"] = "UNSET"
    description: Optional[str] = None


class SpanEvent(_Wire):
    name: str = Field(max_length=MAX_NAME_LENGTH)
    timestamp: Optional[Number] = None
    attributes: dict[str, Any] = Field(default_factory=dict, max_length=MAX_KEYS)


class SpanIn(_Wire):
    """A span as a producer sends it (OpenTelemetry shape); the store assigns sequence_id."""

    rollout_id: str = Field(max_length=MAX_NAME_LENGTH)
    attempt_id: str = Field(max_length=MAX_NAME_LENGTH)
    name: str = Field(max_length=MAX_NAME_LENGTH)
    trace_id: str = Field(default_factory=lambda: uuid.uuid4().hex, max_length=MAX_NAME_LENGTH)
    span_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:16], max_length=MAX_NAME_LENGTH)
    parent_id: Optional[str] = Field(default=None, max_length=MAX_NAME_LENGTH)
    start_time: Number = Field(default_factory=now)
    end_time: Optional[Number] = None
    attributes: dict[str, Any] = Field(default_factory=dict, max_length=MAX_KEYS)
    events: list[SpanEvent] = Field(default_factory=list, max_length=MAX_EVENTS)
    status: SpanStatus = Field(default_factory=SpanStatus)
    resource: dict[str, Any] = Field(default_factory=dict, max_length=MAX_KEYS)


class Span(SpanIn):
    sequence_id: int = Field(description="order of arrival within the attempt, from 1")


# --------------------------------------------------------------------------- resources


class LLMEndpoint(_Wire):
    """A model agents call. With `agent` set, it names the weights served to that agent's calls.

    Per-agent weights (multi-agent training, each agent its own LoRA): the server's engine serves
    `adapter_path` to every call made by agent `agent` (the name from `llm.for_agent(name)`,
    `kiln.agent(name)` or X-Kiln-Agent); agents without such an endpoint get the main weights
    (the endpoint named "main", or the first one without `agent`).
    """

    endpoint: Optional[str] = Field(default=None, description="OpenAI base URL; runners rewrite it per attempt")
    model: str
    sampling: dict[str, Any] = Field(default_factory=dict, max_length=MAX_KEYS)
    adapter_path: Optional[str] = Field(default=None, description="LoRA adapter or full weights to serve")
    agent: Optional[str] = Field(
        default=None,
        pattern=f"^{AGENT_NAME_PATTERN}$",
        description="serve adapter_path to this agent's calls only (None: an ordinary endpoint)",
    )


@functools.cache
def _jinja_env() -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment()


class PromptTemplate(_Wire):
    template: str = Field(max_length=MAX_PROMPT_LENGTH)
    engine: Literal["f-string", "jinja"] = "f-string"

    def format(self, **values: Any) -> str:
        """Render with `values`. Templates come from the store, so they are data, never code.

        jinja renders in jinja2's immutable sandbox (no attribute walks to `__globals__`, no
        mutation of the values); f-string fields must be plain names (`{name}`, not `{x.attr}`
        or `{x[0]}`, which would read arbitrary attributes of the values).
        """
        if self.engine == "jinja":
            return _jinja_env().from_string(self.template).render(**values)
        for _, field, spec, _ in string.Formatter().parse(self.template):
            if field is not None and (not field.isidentifier() or "{" in (spec or "")):
                raise ValueError(f"f-string prompt fields must be plain names, got {{{field}}}")
        return self.template.format(**values)


class ResourcesIn(_Wire):
    llms: dict[str, LLMEndpoint] = Field(default_factory=dict, max_length=MAX_KEYS)
    prompts: dict[str, PromptTemplate] = Field(default_factory=dict, max_length=MAX_KEYS)
    metadata: dict[str, Any] = Field(default_factory=dict, max_length=MAX_KEYS)
    candidate: StrictBool = Field(
        default=False,
        description="a version for a canary to try on a share of sessions: never the latest deployed one"
        " (get_latest_resources skips it) until a canary promotes it",
    )

    @field_validator("llms")
    @classmethod
    def _one_endpoint_per_agent(cls, llms: dict[str, LLMEndpoint]) -> dict[str, LLMEndpoint]:
        seen: dict[str, str] = {}
        for key, llm in llms.items():
            if llm.agent is not None:
                if llm.agent in seen:
                    raise ValueError(f"agent {llm.agent!r} has two endpoints: {seen[llm.agent]!r} and {key!r}")
                seen[llm.agent] = key
        return llms

    def main_llm(self) -> Optional[LLMEndpoint]:
        """The endpoint every agent without its own weights is served: "main", else the first non-agent one."""
        main = self.llms.get("main")
        if main is not None and main.agent is None:
            return main
        return next((llm for llm in self.llms.values() if llm.agent is None), None)

    def agent_llms(self) -> dict[str, LLMEndpoint]:
        """Agent name -> the endpoint naming that agent's own weights."""
        return {llm.agent: llm for llm in self.llms.values() if llm.agent is not None}


class Resources(ResourcesIn):
    resources_id: str
    version: int = Field(description="1, 2, ... in order of publication")
    created_at: float = Field(default_factory=now)


# --------------------------------------------------------------------------- workers


class WorkerStatus(str, Enum):
    idle = "idle"
    busy = "busy"
    stopped = "stopped"


class Worker(_Wire):
    worker_id: str
    status: WorkerStatus = WorkerStatus.idle
    last_heartbeat: float = Field(default_factory=now)
    current_rollout_id: Optional[str] = None
    current_attempt_id: Optional[str] = None
    metadata: dict[str, Any] = Field(default_factory=dict)


# --------------------------------------------------------------------------- training data


class Transition(_Wire):
    """One LLM call of a trained agent, ready for a token-level RL update."""

    rollout_id: str
    attempt_id: str
    agent: Optional[str] = None
    step: int
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float] = Field(description="sampling-time logprob of each response token")
    response_mask: list[int] = Field(
        default_factory=list, description="1 = model-generated token trained on, 0 = tool/env token (merged turns)"
    )
    reward: float = 0.0
    return_: float = Field(default=0.0, alias="return")
    advantage: float = 0.0
    done: bool = False
    group_id: Optional[str] = None
    model_version: Optional[str] = None
    temperature: Optional[float] = Field(
        default=None, description="the call's sampling temperature (None: not recorded; the learner's config one)"
    )
    top_p: Optional[float] = Field(default=None, description="the call's top_p (recorded; see training/learner.py)")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("logprobs")
    @classmethod
    def _finite(cls, v: list[float]) -> list[float]:
        return [float(x) for x in v]


# --------------------------------------------------------------------------- feedback (learning from use)

FeedbackValue = Union[StrictBool, Number, Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH)]]
SESSION_ID_PATTERN = r"^[A-Za-z0-9_.:@\-]{1,256}$"


class FeedbackIn(_Wire):
    """A user's judgement of one answer (`response_id`), one span (`span_id` with its `rollout_id`),
    or a whole session (`session_id`): exactly one target. Shapes as Langfuse scores and LangSmith
    feedback; `client_id` makes a retried post idempotent (the first stored comes back)."""

    # The one-target rule in the JSON schema too, so API clients and testers know it (_one_target checks it).
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["response_id"], "properties": {
            "response_id": {"type": "string"}, "session_id": {"type": "null"}, "span_id": {"type": "null"}}},
        {"required": ["session_id"], "properties": {
            "session_id": {"type": "string"}, "response_id": {"type": "null"}, "span_id": {"type": "null"}}},
        {"required": ["span_id", "rollout_id"], "properties": {
            "span_id": {"type": "string"}, "rollout_id": {"type": "string"}, "response_id": {"type": "null"},
            "session_id": {"type": "null"}}},
    ]})  # fmt: skip

    response_id: Optional[str] = Field(default=None, max_length=MAX_NAME_LENGTH, description="chat completion / response id")
    session_id: Optional[str] = Field(default=None, pattern=SESSION_ID_PATTERN)
    span_id: Optional[str] = Field(default=None, max_length=MAX_NAME_LENGTH)
    rollout_id: Optional[str] = Field(default=None, max_length=MAX_NAME_LENGTH, description="needed with span_id")
    name: str = Field(default="user", min_length=1, max_length=MAX_NAME_LENGTH, description="e.g. thumbs, rating")
    value: FeedbackValue = Field(description="a number, a bool (thumbs) or a category label")
    comment: Optional[str] = Field(default=None, max_length=100_000)
    correction: Optional[str] = Field(default=None, max_length=MAX_INPUT_BYTES, description="the answer the user wanted")
    client_id: Optional[str] = Field(default=None, max_length=MAX_NAME_LENGTH, description="idempotency key of this post")
    source: str = Field(default="api", max_length=MAX_NAME_LENGTH, description="api, otlp, simulated, ...")
    metadata: dict[str, Any] = Field(default_factory=dict, max_length=MAX_KEYS)

    @model_validator(mode="after")
    def _one_target(self) -> "FeedbackIn":
        targets = [t for t in (self.response_id, self.session_id, self.span_id) if t is not None]
        if len(targets) != 1:
            raise ValueError("name exactly one target: response_id, session_id or span_id (with rollout_id)")
        if self.span_id is not None and self.rollout_id is None:
            raise ValueError("span_id needs the rollout_id it belongs to")
        return self


class Feedback(FeedbackIn):
    """Stored feedback, with the call or session it was resolved to."""

    feedback_id: str
    created_at: float = Field(default_factory=now)
    attempt_id: Optional[str] = Field(default=None, description="resolved: the attempt of the rated call")
    resolved_span_id: Optional[str] = Field(default=None, description="resolved: the span of the rated call")
    model_version: Optional[str] = Field(default=None, description="resolved: the version that served the rated call")


# --------------------------------------------------------------------------- canary


class CanaryStatus(str, Enum):
    active = "active"
    promoted = "promoted"
    rolled_back = "rolled_back"


class CanaryRule(_Wire):
    """When a canary decides by itself (agentkiln/production/canary.py states the statistics).

    Per version, the mean of the feedback `metric` over rated sessions (booleans as 0/1); the
    difference candidate - baseline has a normal-approximation interval at `confidence`.
    Rolled back when its upper bound < -max_regression (worse beyond doubt); promoted when its lower
    bound > -max_regression (not worse beyond the margin), each once both sides have
    `min_samples` rated sessions; at `max_samples` each without a verdict it is rolled back
    (no evidence the candidate is as good).
    """

    metric: str = Field(default="user", min_length=1, max_length=MAX_NAME_LENGTH, description="feedback name compared")
    min_samples: Integer = Field(default=30, ge=1, le=1_000_000)
    max_samples: Integer = Field(default=2_000, ge=1, le=10_000_000)
    confidence: Number = Field(default=0.95, gt=0.5, lt=1.0)
    max_regression: Number = Field(default=0.0, ge=0.0, le=1.0)
    auto: bool = Field(default=True, description="decide by the rule (False: only by kiln canary promote/rollback)")


class CanaryIn(_Wire):
    candidate_resources_id: str = Field(max_length=MAX_NAME_LENGTH)
    baseline_resources_id: Optional[str] = Field(
        default=None, max_length=MAX_NAME_LENGTH, description="default: the latest deployed version"
    )
    share: Number = Field(default=0.2, gt=0.0, lt=1.0, description="share of sessions the candidate serves")
    rule: CanaryRule = Field(default_factory=CanaryRule)


class CanaryDecision(_Wire):
    """A recorded step of a canary: started, promoted or rolled back, by whom, on what evidence."""

    action: Literal["start", "promote", "rollback"]
    by: Literal["rule", "user"] = "rule"
    at: float = Field(default_factory=now)
    reason: str = ""
    stats: dict[str, Any] = Field(default_factory=dict)


class Canary(CanaryIn):
    canary_id: str
    baseline_resources_id: str = Field(max_length=MAX_NAME_LENGTH)  # type: ignore[assignment]
    status: CanaryStatus = CanaryStatus.active
    started_at: float = Field(default_factory=now)
    ended_at: Optional[float] = None
    promoted_resources_id: Optional[str] = Field(default=None, description="the deployed version a promotion published")
    decisions: list[CanaryDecision] = Field(default_factory=list)


# --------------------------------------------------------------------------- Responses API state

MAX_RECORD_BYTES = 10**15  # a byte count any store column holds (and JSON numbers carry exactly)


class StoredResponse(_Wire):
    """A Responses API response kept for `previous_response_id`, GET and DELETE (gateway/responses/state.py).

    In the store, not in one server process, so it outlives a restart and every replica on one
    database finds it. Immutable once stored: a later turn is a new record with the longer conversation.
    """

    response_id: str = Field(min_length=1, max_length=MAX_NAME_LENGTH)
    response: dict[str, Any] = Field(description="the response object as the API returned it")
    input_items: list[dict[str, Any]] = Field(default_factory=list, description="this request's input, with ids")
    conversation: list[dict[str, Any]] = Field(
        default_factory=list, description="every item up to and including its output: what a continuation sends"
    )
    rollout_id: Optional[str] = Field(
        default=None, max_length=MAX_NAME_LENGTH, description="owner: the attempt that made it (None: not recorded)"
    )
    attempt_id: Optional[str] = Field(default=None, max_length=MAX_NAME_LENGTH)
    created_at: Number = Field(default_factory=now)
    size: Integer = Field(
        ge=0, le=MAX_RECORD_BYTES, description="JSON bytes of response, input items and conversation (the byte bound)"
    )
