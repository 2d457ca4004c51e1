"""Turn one gateway call into store spans (what RL training later reads).

n > 1: we write ONE SPAN PER CHOICE. Each span holds the shared prompt token ids and the
request, plus that choice's response ids, logprobs, finish reason and an OpenAI-shaped
response restricted to that choice. Every span is then a complete (prompt, response)
sample, so the adapter needs no special case for n > 1; `kiln.llm.choice_index` and
`kiln.llm.call_id` say which choice of which call a span came from.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from agentkiln.engine.base import ChatRequest, ChatResult
from agentkiln.gateway.agent_names import PROMPT_ROLES, AgentNames
from agentkiln.models import FailureKind, SpanIn, SpanStatus
from agentkiln.protocol import Headers, LLMCall, SpanAttrs, SpanNames


def resolve_agent_name(
    headers: Mapping[str, str],
    metadata: Optional[Mapping[str, Any]],
    user: Optional[str],
    messages: list[dict],
    path_agent: Optional[str] = None,
    agent_names: Optional[AgentNames] = None,
) -> Optional[str]:
    """Which agent made the call, first found of: the `/agent/{name}/v1` path, the X-Kiln-Agent
    header, metadata.agent, the user's `agent_names` map (a rule found in the system/developer
    prompt), the `user` field, then the last system/developer message's `name`; else None.

    The name is what lets the adapter train only some agents of a multi-agent program (and the
    engine serve an agent its own weights). The path wins because it was fixed when that agent's
    client was built (`llm.for_agent(name)`); header and metadata are set per call by the agent's
    code. The map comes next, ahead of `user`: it is the operator's explicit rule, while `user` is
    OpenAI's end-user id that clients also fill for other reasons (with no map configured the order
    of the other sources is unchanged). Names the client put on messages come last, and only the
    system message's: it speaks for the calling agent. Other messages' names are not used, because
    they name who said that message — AutoGen (0.4+) puts the sender's name on user messages (the
    user, the other agents) and none on system or assistant messages, so a team sharing one client
    sends nothing that names the speaker, and needs the map (or `for_agent` clients).
    """
    if path_agent:
        return path_agent
    header = headers.get(Headers.agent)
    if header:
        return header
    if metadata and isinstance(metadata.get("agent"), str) and metadata["agent"]:
        return metadata["agent"]
    if agent_names:
        mapped = agent_names.name_for(messages)
        if mapped is not None:
            return mapped
    if user:
        return user
    for msg in reversed(messages):
        if msg.get("role") in PROMPT_ROLES and msg.get("name"):
            return str(msg["name"])
    return None


@dataclass
class CallContext:
    """What we know about a call before the engine answers."""

    rollout_id: str
    attempt_id: str
    api: str
    call_id: str
    agent_name: Optional[str]
    engine_request: ChatRequest
    start_time: float
    stream: bool = False
    session_id: Optional[str] = None  # production calls: the session recorded on
    canary_id: Optional[str] = None  # routed to this canary's candidate
    candidate_versions: frozenset[str] = frozenset()  # what its weights answer as (else the canary had just ended)


def _asked(req: ChatRequest, name: str) -> Any:
    """A sampling setting the agent sent beyond temperature/top_p (a request field, or passed through)."""
    value = getattr(req, name, None)
    if value is None:
        value = (getattr(req, "passthrough", None) or {}).get(name)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _call(ctx: CallContext, **fields: Any) -> LLMCall:
    # model_construct: the gateway built every field itself; validating again costs latency.
    req = ctx.engine_request
    return LLMCall.model_construct(
        request=req.model_dump(mode="json"),
        # What the engine sampled with (the learner takes log-probs under the same settings).
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=_asked(req, "top_k"),
        min_p=_asked(req, "min_p"),
        agent=ctx.agent_name,
        call_id=ctx.call_id,
        api=ctx.api,
        stream=ctx.stream,
        session_id=ctx.session_id,
        canary_id=ctx.canary_id if fields.get("model_version") in ctx.candidate_versions else None,
        **fields,
    )


def spans_for_result(
    ctx: CallContext,
    result: ChatResult,
    end_time: float,
    response_for_choice: Callable[[int], dict[str, Any]],
) -> list[SpanIn]:
    """One llm_call span per choice; `response_for_choice(i)` gives the OpenAI body limited to choice i."""
    spans = []
    for i, choice in enumerate(result.choices):
        attrs = _call(
            ctx,
            response=response_for_choice(i),
            prompt_ids=list(result.prompt_ids),
            response_ids=list(choice.response_ids),
            logprobs=list(choice.logprobs),
            model_version=result.model_version,
            latency_s=end_time - ctx.start_time,
            finish_reason=choice.finish_reason,
            parse_error=choice.parse_error,
            choice_index=choice.index,
            constrained=choice.constrained,
        ).attributes()
        spans.append(_span(ctx, attrs, end_time, SpanStatus(code="OK")))
    return spans


def span_for_error(ctx: CallContext, exc: BaseException, end_time: float, model_version: Optional[str]) -> SpanIn:
    """The engine failed: keep a trace of it so the attempt can be attributed to an LLM error."""
    attrs = _call(ctx, model_version=model_version, latency_s=end_time - ctx.start_time).attributes()
    attrs.update(
        {
            SpanAttrs.failure_kind: FailureKind.llm_error.value,
            SpanAttrs.exception_type: type(exc).__name__,
            SpanAttrs.exception_message: str(exc),
            SpanAttrs.exception_stack: "".join(traceback.format_exception(exc))[-8000:],
        }
    )
    return _span(ctx, attrs, end_time, SpanStatus(code="ERROR", description=f"{type(exc).__name__}: {exc}"[:1000]))


def _span(ctx: CallContext, attrs: dict[str, Any], end_time: float, status: SpanStatus) -> SpanIn:
    return SpanIn(
        rollout_id=ctx.rollout_id,
        attempt_id=ctx.attempt_id,
        name=SpanNames.llm_call,
        start_time=ctx.start_time,
        end_time=end_time,
        attributes=attrs,
        status=status,
    )
