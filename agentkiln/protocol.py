"""The wire protocol every AgentKiln process speaks, declared once.

Routes and URL builders, header names, environment variables handed to sidecar agents, span
names, every `kiln.*` attribute key, and `LLMCall`: the typed record of one LLM call that the
gateway writes and the adapter, the loop guard, `kiln dev` and APO read. A key spelled twice in
two modules drifts; everything that crosses a process boundary takes its name from here.

This module imports nothing heavier than pydantic, so a runner-only install can use it.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict

# --------------------------------------------------------------------------- routes

API_PREFIX = "/api/v1"  # the store API (rollouts, attempts, spans, resources, workers, engine status)
OPENAI_PREFIX = "/v1"  # the OpenAI-compatible gateway, unrecorded unless headers name an attempt
ATTEMPT_ROUTE = "/rollout/{rollout_id}/attempt/{attempt_id}/v1"  # one attempt's recorded gateway
ATTEMPT_AGENT_ROUTE = "/rollout/{rollout_id}/attempt/{attempt_id}/agent/{agent_name}/v1"
OTLP_TRACES_PATH = "/v1/traces"
ENGINE_STATUS_PATH = API_PREFIX + "/engine"
FEEDBACK_PATH = API_PREFIX + "/feedback"  # users' judgements of answers and sessions (feedback key may post)
CANARIES_PATH = API_PREFIX + "/canaries"  # candidate versions on a share of production sessions

# A production session (plain /v1 calls grouped by X-Kiln-Session or inferred): one rollout of mode
# "production" with one long-lived attempt; its id follows from the session id.
SESSION_ATTEMPT_ID = "live"


def session_rollout_id(session_id: str) -> str:
    """The rollout a production session is recorded as (stable, so any replica finds it)."""
    return "session-" + hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()[:24]

# Agent names travel in URL paths, headers and regexes.
AGENT_NAME_PATTERN = r"[A-Za-z0-9_.\-]{1,128}"
_AGENT_NAME_RE = re.compile(AGENT_NAME_PATTERN)
# A per-attempt gateway URL, optionally naming an agent.
_ATTEMPT_URL_RE = re.compile(
    r"^(?P<root>(?P<server>.*)/rollout/(?P<rollout_id>[^/]+)/attempt/(?P<attempt_id>[^/]+))"
    r"(?:/agent/(?P<agent>[^/]+))?/v1/?$"
)


def is_valid_agent_name(name: object) -> bool:
    """1-128 characters of [A-Za-z0-9_.-]: safe in a URL path segment, a header and a regex match."""
    return isinstance(name, str) and _AGENT_NAME_RE.fullmatch(name) is not None


def validate_agent_name(name: str) -> str:
    if not is_valid_agent_name(name):
        raise ValueError(f"agent name must be 1-128 characters of A-Z a-z 0-9 _ . -, got {name!r}")
    return name


def api_url(server: str, path: str = "") -> str:
    """`{server}/api/v1{path}`."""
    return server.rstrip("/") + API_PREFIX + path


def auth_headers(credential: Optional[str]) -> dict[str, str]:
    """The header a client sends its key or attempt token in (none without one)."""
    return {"Authorization": f"Bearer {credential}"} if credential else {}


def attempt_base_url(server: str, rollout_id: str, attempt_id: str, agent: Optional[str] = None) -> str:
    """The OpenAI base URL an agent uses for one attempt (its calls are recorded on that attempt)."""
    root = f"{server.rstrip('/')}/rollout/{rollout_id}/attempt/{attempt_id}"
    return f"{root}/agent/{validate_agent_name(agent)}/v1" if agent else f"{root}/v1"


@dataclass(frozen=True)
class AttemptURL:
    server: str
    rollout_id: str
    attempt_id: str
    agent: Optional[str]


def parse_attempt_url(url: Optional[str]) -> Optional[AttemptURL]:
    """The parts of a per-attempt gateway URL, or None for any other URL."""
    match = _ATTEMPT_URL_RE.match(url or "")
    if match is None:
        return None
    return AttemptURL(match["server"], match["rollout_id"], match["attempt_id"], match["agent"])


def with_agent(url: Optional[str], agent: str) -> Optional[str]:
    """`url` naming `agent` when it is a per-attempt URL; any other URL unchanged."""
    parts = parse_attempt_url(url)
    if parts is None:
        return url
    return attempt_base_url(parts.server, parts.rollout_id, parts.attempt_id, agent)


# --------------------------------------------------------------------------- headers and environment


class Headers:
    """HTTP headers (lower case, as ASGI delivers them)."""

    agent = "x-kiln-agent"
    rollout_id = "x-kiln-rollout-id"
    attempt_id = "x-kiln-attempt-id"
    api_key = "x-api-key"
    idempotency_key = "idempotency-key"
    session = "x-kiln-session"  # groups plain /v1 calls of a deployed agent into one session
    capture = "x-kiln-capture"  # "off": this call is served but not recorded (production opt-out)


class EnvVars:
    """What a sidecar agent (any language) reads from its environment."""

    server_url = "KILN_SERVER_URL"
    api_key = "KILN_API_KEY"
    rollout_id = "KILN_ROLLOUT_ID"
    attempt_id = "KILN_ATTEMPT_ID"
    attempt_number = "KILN_ATTEMPT_NUMBER"
    task = "KILN_TASK"
    model = "KILN_MODEL"
    sampling = "KILN_SAMPLING"
    prompts = "KILN_PROMPTS"
    openai_base_url = "OPENAI_BASE_URL"
    openai_api_key = "OPENAI_API_KEY"
    otel_traces_endpoint = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    otel_traces_protocol = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
    otel_resource_attributes = "OTEL_RESOURCE_ATTRIBUTES"
    otel_traces_headers = "OTEL_EXPORTER_OTLP_TRACES_HEADERS"


# --------------------------------------------------------------------------- spans


class SpanNames:
    llm_call = "kiln.llm.call"  # one gateway call (chat completion / response), one span per choice
    reward = "kiln.reward"  # emitted reward (final or intermediate)
    message = "kiln.message"
    object = "kiln.object"
    exception = "kiln.exception"
    tool = "kiln.tool"
    sidecar = "kiln.sidecar"


class SpanAttrs:
    # which attempt a span belongs to (OTLP resource/span attributes of framework spans)
    rollout_id = "kiln.rollout_id"
    attempt_id = "kiln.attempt_id"
    # rewards
    reward_value = "kiln.reward.value"  # float
    reward_name = "kiln.reward.name"  # "primary" unless given
    reward_final = "kiln.reward.final"  # bool: final vs intermediate
    reward_dims = "kiln.reward.dims"  # dict[str, float] for multi-dimensional rewards
    # llm calls (written by the gateway only; see LLMCall)
    agent_name = "kiln.agent.name"
    model_version = "kiln.model.version"
    request = "kiln.llm.request"  # the engine request (messages, tools, sampling)
    response = "kiln.llm.response"  # the OpenAI-shaped response body, limited to this choice
    prompt_token_ids = "kiln.llm.prompt_token_ids"
    response_token_ids = "kiln.llm.response_token_ids"
    response_logprobs = "kiln.llm.response_logprobs"
    finish_reason = "kiln.llm.finish_reason"
    parse_error = "kiln.llm.parse_error"  # str: why a tool call could not be parsed
    # bool: sampled under a grammar (structured output / forced tool call); the recorded logprobs
    # are still the model's own (unmasked), what the learner recomputes (engine/embedded/grammar.py)
    constrained = "kiln.llm.constrained"
    latency_s = "kiln.llm.latency_s"
    choice_index = "kiln.llm.choice_index"
    call_id = "kiln.llm.call_id"  # chat completion / response id, shared by the choices of one call
    api = "kiln.llm.api"  # "chat.completions" or "responses"
    stream = "kiln.llm.stream"
    # the sampling settings the engine used for this call (what the agent asked for, normalised)
    temperature = "kiln.llm.temperature"  # float; below GREEDY_BELOW_TEMPERATURE: greedy
    top_p = "kiln.llm.top_p"  # float
    top_k = "kiln.llm.top_k"  # int, only when the engine applied one
    min_p = "kiln.llm.min_p"  # float, only when the engine applied one
    # production capture (plain /v1 calls recorded on their session)
    session_id = "kiln.llm.session_id"  # str: the session a production call was grouped into
    canary_id = "kiln.llm.canary_id"  # str: the canary whose candidate served this call
    redacted = "kiln.llm.redacted"  # bool: text was redacted before storing (token ids dropped)
    # failures
    failure_kind = "kiln.failure.kind"
    exception_type = "kiln.exception.type"
    exception_message = "kiln.exception.message"
    exception_stack = "kiln.exception.stack"
    # messages, objects, tools, sidecars (written by the runner)
    message_text = "kiln.message.text"
    object_value = "kiln.object.value"
    object_type = "kiln.object.type"
    tool_name = "kiln.tool.name"
    tool_arguments = "kiln.tool.arguments"
    sidecar_command = "kiln.sidecar.command"
    sidecar_exit_code = "kiln.sidecar.exit_code"
    sidecar_stdout_tail = "kiln.sidecar.stdout_tail"
    sidecar_stderr_tail = "kiln.sidecar.stderr_tail"


LLM_ONLY_PREFIX = "kiln.llm."  # attributes only the gateway may write


# --------------------------------------------------------------------------- callers


class Role(str, Enum):
    """What a credential may do (server/auth.py holds the route policy)."""

    admin = "admin"
    runner = "runner"
    attempt = "attempt"
    feedback = "feedback"  # write-only: may post feedback, nothing else (a front end holds it)


@dataclass(frozen=True)
class Principal:
    """The caller of one request, as the server's auth middleware identified it (request.state.principal)."""

    role: Role
    rollout_id: Optional[str] = None
    attempt_id: Optional[str] = None


ADMIN = Principal(Role.admin)


def principal_of(request: Any) -> Principal:
    """The caller of a Starlette request; admin when the server runs without keys."""
    return getattr(request.state, "principal", ADMIN)


# --------------------------------------------------------------------------- one LLM call


def _numbers(value: Any, kind: type) -> Optional[list[Any]]:
    """`value` as a list of `kind` (int or float), or None when it is not a list of numbers."""
    if not isinstance(value, (list, tuple)):
        return None
    try:
        return [kind(x) for x in value]
    except (TypeError, ValueError):
        return None


def _opt_str(value: Any) -> Optional[str]:
    return None if value is None else str(value)


def _opt_float(value: Any) -> Optional[float]:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _opt_int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _function_calls(message: dict[str, Any]) -> list[tuple[Any, Any]]:
    """[(name, arguments), ...] of a chat message's tool calls (their random ids left out)."""
    calls = []
    for call in message.get("tool_calls") or []:
        if isinstance(call, dict):
            function = call.get("function") or {}
            calls.append((function.get("name"), function.get("arguments")))
    return calls


class LLMCall(BaseModel):
    """One choice of one gateway call, as recorded on its `kiln.llm.call` span.

    `from_attributes` is tolerant (a field that does not parse is None and `logprobs_valid` says
    whether logprobs were present but unreadable), because spans also arrive from other
    producers and the adapter must report why a call was left out instead of failing.
    """

    model_config = ConfigDict(extra="forbid")

    call_id: Optional[str] = None
    choice_index: int = 0
    api: Optional[Literal["chat.completions", "responses"]] = None
    stream: bool = False
    agent: Optional[str] = None
    model_version: Optional[str] = None
    request: dict[str, Any] = {}
    response: Optional[dict[str, Any]] = None
    prompt_ids: Optional[list[int]] = None
    response_ids: Optional[list[int]] = None
    logprobs: Optional[list[float]] = None
    logprobs_valid: bool = True
    finish_reason: Optional[str] = None
    parse_error: Optional[str] = None
    latency_s: Optional[float] = None
    constrained: bool = False
    temperature: Optional[float] = None  # the call's own sampling settings (None: not recorded)
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    session_id: Optional[str] = None  # production calls: their session; canary_id: the canary whose
    canary_id: Optional[str] = None  # candidate served it; redacted: text redacted, token ids dropped
    redacted: bool = False

    def attributes(self) -> dict[str, Any]:
        """The span attributes this call is recorded as (the inverse of `from_attributes`)."""
        attrs: dict[str, Any] = {
            SpanAttrs.request: self.request,
            SpanAttrs.agent_name: self.agent,
            SpanAttrs.call_id: self.call_id,
            SpanAttrs.api: self.api,
            SpanAttrs.stream: self.stream,
            SpanAttrs.model_version: self.model_version,
            SpanAttrs.latency_s: self.latency_s,
        }
        for key, value in (
            (SpanAttrs.temperature, self.temperature),
            (SpanAttrs.top_p, self.top_p),
            (SpanAttrs.top_k, self.top_k),
            (SpanAttrs.min_p, self.min_p),
            (SpanAttrs.session_id, self.session_id),
            (SpanAttrs.canary_id, self.canary_id),
        ):
            if value is not None:
                attrs[key] = value
        if self.response is not None:
            attrs.update(
                {
                    SpanAttrs.response: self.response,
                    SpanAttrs.prompt_token_ids: self.prompt_ids,
                    SpanAttrs.response_token_ids: self.response_ids,
                    SpanAttrs.response_logprobs: self.logprobs,
                    SpanAttrs.finish_reason: self.finish_reason,
                    SpanAttrs.parse_error: self.parse_error,
                    SpanAttrs.choice_index: self.choice_index,
                }
            )
            if self.constrained:
                attrs[SpanAttrs.constrained] = True
        if self.redacted:
            attrs[SpanAttrs.redacted] = True
        return attrs

    @classmethod
    def from_attributes(cls, attrs: dict[str, Any]) -> LLMCall:
        raw_lp = attrs.get(SpanAttrs.response_logprobs)
        logprobs = _numbers(raw_lp, float)
        request = attrs.get(SpanAttrs.request)
        response = attrs.get(SpanAttrs.response)
        api = attrs.get(SpanAttrs.api)
        latency = attrs.get(SpanAttrs.latency_s)
        index = attrs.get(SpanAttrs.choice_index)
        # Every field is converted above to its declared type: skip a second validation pass.
        return cls.model_construct(
            call_id=_opt_str(attrs.get(SpanAttrs.call_id)),
            choice_index=index if isinstance(index, int) and not isinstance(index, bool) else 0,
            api=api if api in ("chat.completions", "responses") else None,
            stream=bool(attrs.get(SpanAttrs.stream, False)),
            agent=_opt_str(attrs.get(SpanAttrs.agent_name)),
            model_version=_opt_str(attrs.get(SpanAttrs.model_version)),
            request=request if isinstance(request, dict) else {},
            response=response if isinstance(response, dict) else None,
            prompt_ids=_numbers(attrs.get(SpanAttrs.prompt_token_ids), int),
            response_ids=_numbers(attrs.get(SpanAttrs.response_token_ids), int),
            logprobs=logprobs,
            logprobs_valid=raw_lp is None or logprobs is not None,
            finish_reason=_opt_str(attrs.get(SpanAttrs.finish_reason)),
            parse_error=_opt_str(attrs.get(SpanAttrs.parse_error)),
            latency_s=float(latency) if isinstance(latency, (int, float)) and math.isfinite(latency) else None,
            constrained=attrs.get(SpanAttrs.constrained) is True,
            temperature=_opt_float(attrs.get(SpanAttrs.temperature)),
            top_p=_opt_float(attrs.get(SpanAttrs.top_p)),
            top_k=_opt_int(attrs.get(SpanAttrs.top_k)),
            min_p=_opt_float(attrs.get(SpanAttrs.min_p)),
            session_id=_opt_str(attrs.get(SpanAttrs.session_id)),
            canary_id=_opt_str(attrs.get(SpanAttrs.canary_id)),
            redacted=attrs.get(SpanAttrs.redacted) is True,
        )

    @classmethod
    def from_span(cls, span: Any) -> LLMCall:
        return cls.from_attributes(span.attributes or {})

    @staticmethod
    def agent_of(span: Any) -> Optional[str]:
        """Just the calling agent's name, without parsing the token lists."""
        return _opt_str((span.attributes or {}).get(SpanAttrs.agent_name))

    # ---- what readers want from the OpenAI bodies (parsed here, nowhere else)

    @property
    def messages(self) -> list[dict[str, Any]]:
        messages = self.request.get("messages")
        return [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []

    def last_input(self) -> Any:
        """The content of the last message sent (or the Responses `input`)."""
        messages = self.messages
        return messages[-1].get("content") if messages else self.request.get("input")

    def reply(self) -> tuple[Optional[str], list[tuple[Any, Any]]]:
        """(content, [(tool name, arguments), ...]) of the first choice in the response body."""
        body = self.response or {}
        choices = body.get("choices")
        if isinstance(choices, list) and choices:
            msg = (choices[0] or {}).get("message") or {}
            calls = _function_calls(msg)
            content = msg.get("content")
            return (None if content is None else str(content)), calls
        if "output" in body:  # Responses API
            text_parts, calls = [], []
            for item in body.get("output") or []:
                if not isinstance(item, dict):
                    continue
                if item.get("type") == "function_call":
                    calls.append((item.get("name"), item.get("arguments")))
                for part in item.get("content") or []:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        text_parts.append(part["text"])
            text = body.get("output_text") if isinstance(body.get("output_text"), str) else "".join(text_parts)
            return (text or None), calls
        return None, []

    def reply_text(self) -> str:
        """The reply as a person reads it: the content, else the tool calls it made."""
        content, calls = self.reply()
        if content:
            return content
        return "tool call: " + ", ".join(f"{name}({args})" for name, args in calls) if calls else ""

    def action(self) -> Any:
        """What the model did (content + tool calls, without their random ids): loop detection compares these."""
        body = self.response
        if body is None:
            return None
        choices = body.get("choices")
        if isinstance(choices, list) and choices:
            actions = []
            for choice in choices:
                msg = (choice or {}).get("message") or {}
                actions.append((msg.get("content"), _function_calls(msg)))
            return actions
        if "output" in body:
            return [
                {k: v for k, v in item.items() if k not in ("id", "call_id")} if isinstance(item, dict) else item
                for item in body.get("output") or []
            ]
        return body

    def request_key(self) -> Any:
        """The parts of the request that make two calls the same question."""
        return {k: self.request.get(k) for k in ("messages", "input", "instructions", "tools") if k in self.request}
