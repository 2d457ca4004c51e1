"""Wire pieces both OpenAI APIs share: tolerant request models, text content, sampling, logprobs.

Request models accept whatever real clients send (unknown fields are allowed and ignored, so a
newer SDK keeps working) but validate the fields we act on, so a bad body gets a clear 4xx
instead of an engine crash. Everything the engine sees is normalised to plain chat messages
with string content, whichever API the agent used.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from agentkiln.engine.base import ChatChoice, ChatRequest
from agentkiln.gateway.errors import invalid, validation_error_to_gateway

TokenText = Callable[[int], str]  # token id -> its text (Engine.token_text)


class Tolerant(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(Tolerant):
    type: str
    text: Optional[str] = None


_TEXT_PART_TYPES = {"text", "input_text", "output_text", "refusal"}


def content_text(content: Union[str, list[ContentPart], None], where: str) -> str:
    """Collapse text content parts into one string; the engine serves text-only models."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for i, part in enumerate(content):
        if part.type not in _TEXT_PART_TYPES:
            raise invalid(f"Content part type '{part.type}' is not supported (text only)", f"{where}.content.{i}.type")
        texts.append(part.text if part.text is not None else (getattr(part, "refusal", None) or ""))
    return "".join(texts)


def tool_call_dict(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def sampling(temperature: Optional[float], top_p: Optional[float]) -> dict[str, float]:
    """OpenAI allows top_p=0 (the engine needs >0): both mean 'always the most likely token'."""
    t = 1.0 if temperature is None else temperature
    p = 1.0 if top_p is None else top_p
    if p == 0.0:
        t, p = 0.0, 1.0
    return {"temperature": t, "top_p": p}


def engine_request(max_tokens: Optional[int], **kwargs: Any) -> ChatRequest:
    """The engine request; no `max_tokens` leaves the engine contract's default."""
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    try:
        return ChatRequest(**kwargs)
    except ValidationError as exc:
        raise validation_error_to_gateway(exc) from None


def logprob_content(choice: ChatChoice, token_text: TokenText) -> list[dict[str, Any]]:
    """OpenAI `logprobs.content`; `token_id` is our extension so clients can see exact ids.

    We only have the sampled token's logprob, so `top_logprobs` is always empty.
    """
    out = []
    for tid, lp in zip(choice.response_ids, choice.logprobs, strict=False):
        tok = token_text(tid)
        out.append(
            {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8")), "top_logprobs": [], "token_id": tid}
        )
    return out


def now_s() -> int:
    return int(time.time())
