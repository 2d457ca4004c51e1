"""Generated token ids -> the answer the gateway returns, the same way for every token-level engine.

Why shared: the embedded engine and the vLLM engine both sample tokens under our chat template, so
decoding, stop-string cuts and tool-call parsing must be one function, or the two engines would
record different answers for the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from agentkiln.engine.base import ChatChoice, ChatRequest
from agentkiln.engine.chat.template import ChatTemplate


def cut_at_stop(text: str, stop: list[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def build_choice(
    tokenizer: Any,
    template: ChatTemplate,
    request: ChatRequest,
    *,
    index: int,
    ids: list[int],
    logprobs: list[float],
    finish_reason: str,
    constrained: bool,
) -> ChatChoice:
    """One choice from its sampled ids: decoded, cut at the first stop string, tool calls parsed out."""
    raw = tokenizer.decode(ids, skip_special_tokens=True)
    parsed = template.parse(cut_at_stop(raw, request.stop), request.tools)
    return ChatChoice(
        index=index,
        text=parsed.text,
        raw_text=raw,
        tool_calls=parsed.tool_calls,
        finish_reason="tool_calls" if parsed.tool_calls else finish_reason,
        response_ids=list(ids),
        logprobs=list(logprobs),
        parse_error=parsed.parse_error,
        constrained=constrained,
    )


def build_choices(
    tokenizer: Any,
    template: ChatTemplate,
    request: ChatRequest,
    outputs: Iterable[tuple[list[int], list[float], str]],
) -> list[ChatChoice]:
    """`build_choice` for each sampled (ids, logprobs, finish reason), in order."""
    from agentkiln.engine.constraints import grammar_spec

    constrained = grammar_spec(request) is not None
    return [
        build_choice(
            tokenizer,
            template,
            request,
            index=i,
            ids=ids,
            logprobs=logprobs,
            finish_reason=finish,
            constrained=constrained,
        )
        for i, (ids, logprobs, finish) in enumerate(outputs)
    ]
