"""Chat completions wire bodies: the request models, their engine request, and the response/chunk builders."""

from __future__ import annotations

import uuid
from typing import Any, Callable, Iterator, Literal, Optional, Union

from pydantic import Field, field_validator

from agentkiln.engine.base import ChatChoice, ChatRequest, ChatResult
from agentkiln.gateway import limits, sse, structured, wire
from agentkiln.gateway.errors import invalid

# --------------------------------------------------------------------------- request


class FunctionCallIn(wire.Tolerant):
    name: str
    arguments: str = ""


class ToolCallIn(wire.Tolerant):
    id: str = ""
    type: str = "function"
    function: FunctionCallIn


class ChatMessageIn(wire.Tolerant):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Optional[Union[str, list[wire.ContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallIn]] = None
    tool_call_id: Optional[str] = None
    function_call: Optional[FunctionCallIn] = None  # legacy assistant form


class FunctionDef(wire.Tolerant):
    name: str = Field(min_length=1, max_length=256)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ToolIn(wire.Tolerant):
    type: Literal["function"]
    function: FunctionDef


class StreamOptions(wire.Tolerant):
    include_usage: Optional[bool] = None


class ChatCompletionRequest(wire.Tolerant):
    """Bounded as `gateway.limits` says (stop strings, ints, logit_bias, messages)."""

    model: Optional[str] = None
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=limits.MAX_MESSAGES)
    max_tokens: Optional[int] = Field(default=None, ge=1, le=limits.MAX_TOKENS)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1, le=limits.MAX_TOKENS)
    tools: Optional[list[ToolIn]] = None
    functions: Optional[list[FunctionDef]] = None  # legacy
    tool_choice: Optional[Union[Literal["none", "auto", "required"], dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    n: int = Field(default=1, ge=1, le=limits.MAX_N)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    seed: Optional[int] = Field(default=None, ge=limits.INT64_MIN, le=limits.INT64_MAX)
    logit_bias: Optional[dict[str, float]] = Field(default=None, description="validated; not applied")
    user: Optional[str] = None
    metadata: Optional[dict[str, Any]] = None
    return_token_ids: Optional[bool] = Field(default=None, description="vLLM extension: echo token ids back")
    response_format: Optional[dict[str, Any]] = Field(default=None, description="text / json_object / json_schema")

    @field_validator("stop")
    @classmethod
    def _stop_bounded(cls, stop: Optional[Union[str, list[str]]]) -> Optional[Union[str, list[str]]]:
        problem = limits.stop_error([stop] if isinstance(stop, str) else stop or [])
        if problem:
            raise ValueError(problem)
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _bias_bounded(cls, bias: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        problem = limits.logit_bias_error(bias or {})
        if problem:
            raise ValueError(problem)
        return bias


def _chat_messages(messages: list[ChatMessageIn]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        msg: dict[str, Any] = {"role": m.role, "content": wire.content_text(m.content, where)}
        if m.role == "function":  # legacy function result -> tool message
            msg["role"] = "tool"
            msg["tool_call_id"] = m.name or ""
        if m.name is not None:
            msg["name"] = m.name
        if m.role == "assistant":
            calls = [wire.tool_call_dict(tc.id, tc.function.name, tc.function.arguments) for tc in m.tool_calls or []]
            if m.function_call is not None:
                calls.append(wire.tool_call_dict(m.function_call.name, m.function_call.name, m.function_call.arguments))
            if calls:
                msg["tool_calls"] = calls
        if m.role == "tool":
            if not m.tool_call_id:
                raise invalid("A tool message needs 'tool_call_id'", f"{where}.tool_call_id")
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def chat_request_to_engine(req: ChatCompletionRequest, default_max_tokens: Optional[int] = None) -> ChatRequest:
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    tools += [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in req.functions or []]
    tool_choice = req.tool_choice
    if tool_choice is not None and tool_choice != "none" and not tools:
        raise invalid("'tool_choice' is only allowed when 'tools' are given", "tool_choice")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    max_tokens = req.max_completion_tokens or req.max_tokens or default_max_tokens
    limits.check_generation(req.n, max_tokens)
    messages = _chat_messages(req.messages)
    limits.check_prompt_size(messages, tools, "messages")
    return wire.engine_request(
        max_tokens,
        messages=messages,
        tools=tools,
        tool_choice=tool_choice,
        stop=stop,
        n=req.n,
        seed=req.seed,
        model=req.model,
        structured=structured.chat_response_format(req.response_format),
        passthrough=structured.chat_passthrough(req),
        **wire.sampling(req.temperature, req.top_p),
    )


# --------------------------------------------------------------------------- response


def new_chat_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def chat_usage(result: ChatResult, choices: Optional[list[ChatChoice]] = None) -> dict[str, Any]:
    completion = sum(len(c.response_ids) for c in (choices if choices is not None else result.choices))
    prompt = len(result.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_message_out(choice: ChatChoice) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": choice.text, "refusal": None}
    if choice.tool_calls:
        msg["tool_calls"] = [wire.tool_call_dict(tc.id, tc.name, tc.arguments) for tc in choice.tool_calls]
        if not choice.text:
            msg["content"] = None  # what OpenAI sends for a pure tool-call turn
    return msg


def chat_choice_out(
    choice: ChatChoice, *, index: int, logprobs: bool, token_text: wire.TokenText, token_ids: bool = False
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "index": index,
        "message": chat_message_out(choice),
        "finish_reason": choice.finish_reason,
        "logprobs": {"content": wire.logprob_content(choice, token_text), "refusal": None} if logprobs else None,
    }
    if token_ids:
        out["token_ids"] = list(choice.response_ids)
    return out


def chat_completion_out(
    result: ChatResult,
    *,
    completion_id: str,
    created: int,
    logprobs: bool,
    token_text: wire.TokenText,
    choices: Optional[list[ChatChoice]] = None,
    token_ids: bool = False,
) -> dict[str, Any]:
    """A `chat.completion` body; `choices` restricts it to some choices (one span per choice)."""
    chosen = result.choices if choices is None else choices
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": result.model,
        "system_fingerprint": result.model_version,
        "choices": [
            chat_choice_out(c, index=c.index, logprobs=logprobs, token_text=token_text, token_ids=token_ids)
            for c in chosen
        ],
        "usage": chat_usage(result, chosen),
    }
    if token_ids:
        body["prompt_token_ids"] = list(result.prompt_ids)
    return body


# --------------------------------------------------------------------------- stream chunks

ChunkFn = Callable[..., dict[str, Any]]  # (choices, usage=None) -> a chat.completion.chunk


def chat_chunk(
    completion_id: str, created: int, model: str, choices: list[dict[str, Any]], usage: Any = None, with_usage=False
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if with_usage:
        chunk["usage"] = usage
    return chunk


def chunk_choice(index: int, delta: dict[str, Any], finish_reason: Optional[str] = None, logprobs: Any = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


ROLE_DELTA = {"role": "assistant", "content": ""}


def buffered_chunks(
    result: ChatResult, chunk: ChunkFn, include_usage: bool, want_lp: bool, token_text: wire.TokenText
) -> Iterator[str]:
    """A finished result as OpenAI chunk events: role, content (+logprobs), tool_calls, finish, usage."""
    for choice in result.choices:
        i = choice.index
        yield sse.event(chunk([chunk_choice(i, dict(ROLE_DELTA))]))
        if choice.text or want_lp:
            lp = {"content": wire.logprob_content(choice, token_text), "refusal": None} if want_lp else None
            yield sse.event(chunk([chunk_choice(i, {"content": choice.text}, logprobs=lp)]))
        for k, tc in enumerate(choice.tool_calls):
            call = {"index": k, **wire.tool_call_dict(tc.id, tc.name, tc.arguments)}
            yield sse.event(chunk([chunk_choice(i, {"tool_calls": [call]})]))
        yield sse.event(chunk([chunk_choice(i, {}, choice.finish_reason)]))
    if include_usage:
        yield sse.event(chunk([], chat_usage(result)))
    yield sse.DONE
