"""One rollout as a person reads it: attempts, a span timeline, each agent's conversation, tokens, rewards.

Every LLM call is read through `LLMCall` and run through the adapter (`build_transitions`), so
the page says for each call exactly what training does with it: a transition, or the reason
it was left out.
"""

from __future__ import annotations

import json
from typing import Any

from agentkiln.adapter.credit import final_reward, reward_events
from agentkiln.adapter.transitions import build_transitions
from agentkiln.models import Span
from agentkiln.protocol import LLMCall, SpanAttrs, SpanNames
from agentkiln.store.base import Store

MAX_TOKENS_SHOWN = 2_000  # per call; longer replies are cut (the page says so)
MAX_TEXT = 20_000


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text[:MAX_TEXT]


def _token_text(engine: Any, token_id: int) -> str | None:
    if engine is None or not hasattr(engine, "token_text"):
        return None
    try:
        return str(engine.token_text(token_id))
    except Exception:  # noqa: BLE001 - any engine's tokenizer failing shows ids instead of failing the page
        return None


def _tokens(rec: LLMCall, engine: Any) -> list[dict[str, Any]]:
    ids = rec.response_ids or []
    lps = rec.logprobs or []
    return [
        {"id": tid, "text": _token_text(engine, tid), "logprob": lps[i] if i < len(lps) else None}
        for i, tid in enumerate(ids[:MAX_TOKENS_SHOWN])
    ]


def _message(msg: dict[str, Any]) -> dict[str, Any]:
    """A chat message reduced to what the page shows: role, name, text, tool calls, tool result id."""
    content = msg.get("content")
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    calls = []
    for call in msg.get("tool_calls") or []:
        if isinstance(call, dict):
            fn = call.get("function") or {}
            calls.append({"id": call.get("id"), "name": fn.get("name"), "arguments": _text(fn.get("arguments"))})
    return {
        "role": str(msg.get("role") or "?"),
        "name": msg.get("name"),
        "content": None if content is None else _text(content),
        "tool_calls": calls,
        "tool_call_id": msg.get("tool_call_id"),
    }


def _reply_message(rec: LLMCall) -> dict[str, Any] | None:
    content, calls = rec.reply()
    if content is None and not calls:
        return None
    return {
        "role": "assistant",
        "name": None,
        "content": content,
        "tool_calls": [{"id": None, "name": n, "arguments": _text(a)} for n, a in calls],
        "tool_call_id": None,
        "reply": True,
    }


def _conversation(rec: LLMCall) -> list[dict[str, Any]]:
    if rec.messages:
        msgs = [_message(m) for m in rec.messages]
    else:  # Responses API: instructions + input
        msgs = []
        if rec.request.get("instructions"):
            msgs.append(_message({"role": "system", "content": rec.request["instructions"]}))
        raw = rec.request.get("input")
        items = raw if isinstance(raw, list) else [{"role": "user", "content": raw}]
        msgs += [_message(i) if isinstance(i, dict) else _message({"role": "user", "content": i}) for i in items]
    reply = _reply_message(rec)
    return msgs + ([reply] if reply else [])


def _span_label(span: Span) -> str:
    attrs = span.attributes or {}
    if span.name == SpanNames.llm_call:
        return f"LLM call ({attrs.get(SpanAttrs.agent_name) or 'agent'})"
    if span.name == SpanNames.tool:
        return f"tool {attrs.get(SpanAttrs.tool_name) or ''}".strip()
    if span.name == SpanNames.reward:
        return f"reward {attrs.get(SpanAttrs.reward_value)}"
    return span.name


async def rollout_detail(store: Store, rollout_id: str, engine: Any = None) -> dict[str, Any]:
    """Everything the one-rollout page shows (NotFoundError for an unknown id)."""
    rollout = await store.get_rollout(rollout_id)
    attempts = await store.query_attempts(rollout_id)
    spans = await store.query_spans(rollout_id)
    adapted = build_transitions(rollout, attempts, spans)
    skipped = {(s.attempt_id, s.sequence_id): s for s in adapted.report}

    calls, conversations = [], {}
    for span in spans:
        if span.name != SpanNames.llm_call:
            continue
        rec = LLMCall.from_span(span)
        skip = skipped.get((span.attempt_id, span.sequence_id))
        calls.append(
            {
                "attempt_id": span.attempt_id,
                "sequence_id": span.sequence_id,
                "agent": rec.agent,
                "model_version": rec.model_version,
                "finish_reason": rec.finish_reason,
                "latency_s": rec.latency_s,
                "prompt_tokens": len(rec.prompt_ids or []),
                "response_tokens": len(rec.response_ids or []),
                "became_transition": skip is None and span.attempt_id == adapted.attempt_id,
                "skip_reason": skip.reason.value if skip else None,
                "skip_detail": skip.detail if skip else "",
                "reply": _text(rec.reply_text()),
                "tokens": _tokens(rec, engine),
                "tokens_cut": len(rec.response_ids or []) > MAX_TOKENS_SHOWN,
            }
        )
        # Each call carries the whole conversation so far: an agent's latest call is its conversation.
        conversations[(span.attempt_id, rec.agent or "")] = {
            "attempt_id": span.attempt_id,
            "agent": rec.agent,
            "messages": _conversation(rec),
        }

    rewards = [
        {
            "attempt_id": s.attempt_id,
            "sequence_id": s.sequence_id,
            "name": (s.attributes or {}).get(SpanAttrs.reward_name) or "primary",
            "value": (s.attributes or {}).get(SpanAttrs.reward_value),
            "final": bool((s.attributes or {}).get(SpanAttrs.reward_final, True)),
            "dims": (s.attributes or {}).get(SpanAttrs.reward_dims),
        }
        for s in spans
        if s.name == SpanNames.reward
    ]
    latest = attempts[-1].attempt_id if attempts else None
    timeline = [
        {
            "attempt_id": s.attempt_id,
            "sequence_id": s.sequence_id,
            "name": s.name,
            "label": _span_label(s),
            "start_time": s.start_time,
            "end_time": s.end_time,
            "status": s.status.code,
            "error": s.status.description,
        }
        for s in spans
    ]
    return {
        "rollout": rollout.model_dump(mode="json"),
        "attempts": [a.model_dump(mode="json") for a in attempts],
        "timeline": timeline,
        "calls": calls,
        "conversations": list(conversations.values()),
        "rewards": rewards,
        "reward": final_reward(reward_events([s for s in spans if s.attempt_id == latest])),
        "transitions": len(adapted.transitions),
    }
