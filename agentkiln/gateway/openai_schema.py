"""OpenAI wire bodies (chat completions + Responses API) and their conversion to/from the engine contract.

Request models accept whatever real clients send (unknown fields are allowed and ignored, so a
newer SDK keeps working) but validate the fields we act on, so a bad body gets a clear 4xx
instead of an engine crash. Everything the engine sees is normalised to plain chat messages
with string content, whichever API the agent used.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agentkiln.engine.base import ChatChoice, ChatRequest, ChatResult

# --------------------------------------------------------------------------- errors


class GatewayError(Exception):
    """An error the gateway answers in OpenAI's JSON shape {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: Optional[str] = None, code: Optional[str] = None) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _clean_loc(loc: tuple) -> str:
    """Drop pydantic's union-branch tags ('str', 'list[ContentPart]', ...) so `param` is a body path."""
    parts = []
    for p in loc:
        s = str(p)
        if s in _TYPE_TAGS or "[" in s or s.startswith("function-"):
            continue
        parts.append(s)
    return ".".join(parts)


def validation_error_to_gateway(exc: ValidationError) -> GatewayError:
    """The first failing field as one readable message (union alternatives joined), its path as `param`."""
    errors = exc.errors()
    loc = _clean_loc(errors[0].get("loc", ()))
    msgs = list(dict.fromkeys(e.get("msg", "invalid value") for e in errors if _clean_loc(e.get("loc", ())) == loc))
    others = sum(1 for e in errors if _clean_loc(e.get("loc", ())) != loc)
    msg = " or ".join(msgs) + (f" ({others} more errors)" if others else "")
    return invalid(f"Invalid request body at '{loc}': {msg}" if loc else f"Invalid request body: {msg}", loc or None)


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="allow")


# --------------------------------------------------------------------------- chat completions request


class ContentPart(_Tolerant):
    type: str
    text: Optional[str] = None


class FunctionCallIn(_Tolerant):
    name: str
    arguments: str = ""


class ToolCallIn(_Tolerant):
    id: str = ""
    type: str = "function"
    function: FunctionCallIn


class ChatMessageIn(_Tolerant):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallIn]] = None
    tool_call_id: Optional[str] = None
    function_call: Optional[FunctionCallIn] = None  # legacy assistant form


class FunctionDef(_Tolerant):
    name: str = Field(min_length=1, max_length=256)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ToolIn(_Tolerant):
    type: Literal["function"]
    function: FunctionDef


class StreamOptions(_Tolerant):
    include_usage: Optional[bool] = None


class ChatCompletionRequest(_Tolerant):
    model: Optional[str] = None
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    tools: Optional[list[ToolIn]] = None
    functions: Optional[list[FunctionDef]] = None  # legacy
    tool_choice: Optional[Union[Literal["none", "auto", "required"], dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    n: int = Field(default=1, ge=1, le=64)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    seed: Optional[int] = None
    user: Optional[str] = None
    metadata: Optional[dict[str, Any]] = None
    return_token_ids: Optional[bool] = Field(default=None, description="vLLM extension: echo token ids back")


# --------------------------------------------------------------------------- Responses API request


class ResponsesRequest(_Tolerant):
    model: Optional[str] = None
    input: Union[str, list[dict[str, Any]]]
    instructions: Optional[str] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    max_output_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    stream: Optional[bool] = None
    previous_response_id: Optional[str] = None
    conversation: Optional[Any] = None
    include: Optional[list[str]] = None
    metadata: Optional[dict[str, Any]] = None
    user: Optional[str] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)


class _InputMessage(_Tolerant):
    type: Optional[Literal["message"]] = None
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart]]


class _FunctionCallItem(_Tolerant):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str = ""


class _FunctionCallOutputItem(_Tolerant):
    type: Literal["function_call_output"]
    call_id: str
    output: Union[str, list[ContentPart]]


class _ResponsesFunctionTool(_Tolerant):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=256)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


# --------------------------------------------------------------------------- request -> engine

_TEXT_PART_TYPES = {"text", "input_text", "output_text", "refusal"}


def _content_text(content: Union[str, list[ContentPart], None], where: str) -> str:
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


def _tool_call_dict(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _chat_messages(messages: list[ChatMessageIn]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        msg: dict[str, Any] = {"role": m.role, "content": _content_text(m.content, where)}
        if m.role == "function":  # legacy function result -> tool message
            msg["role"] = "tool"
            msg["tool_call_id"] = m.name or ""
        if m.name is not None:
            msg["name"] = m.name
        if m.role == "assistant":
            calls = [_tool_call_dict(tc.id, tc.function.name, tc.function.arguments) for tc in m.tool_calls or []]
            if m.function_call is not None:
                calls.append(_tool_call_dict(m.function_call.name, m.function_call.name, m.function_call.arguments))
            if calls:
                msg["tool_calls"] = calls
        if m.role == "tool":
            if not m.tool_call_id:
                raise invalid("A tool message needs 'tool_call_id'", f"{where}.tool_call_id")
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _sampling(temperature: Optional[float], top_p: Optional[float]) -> dict[str, float]:
    """OpenAI allows top_p=0 (the engine needs >0): both mean 'always the most likely token'."""
    t = 1.0 if temperature is None else temperature
    p = 1.0 if top_p is None else top_p
    if p == 0.0:
        t, p = 0.0, 1.0
    return {"temperature": t, "top_p": p}


def _build(**kwargs: Any) -> ChatRequest:
    try:
        return ChatRequest(**kwargs)
    except ValidationError as exc:
        raise validation_error_to_gateway(exc) from None


def chat_request_to_engine(req: ChatCompletionRequest, default_max_tokens: Optional[int] = None) -> ChatRequest:
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    tools += [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in req.functions or []]
    tool_choice = req.tool_choice
    if tool_choice is not None and tool_choice != "none" and not tools:
        raise invalid("'tool_choice' is only allowed when 'tools' are given", "tool_choice")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    max_tokens = req.max_completion_tokens or req.max_tokens or default_max_tokens
    kwargs: dict[str, Any] = dict(
        messages=_chat_messages(req.messages),
        tools=tools,
        tool_choice=tool_choice,
        stop=stop,
        n=req.n,
        seed=req.seed,
        model=req.model,
        **_sampling(req.temperature, req.top_p),
    )
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    return _build(**kwargs)


def _validate_item(model: type[BaseModel], item: dict[str, Any], where: str) -> Any:
    try:
        return model.model_validate(item)
    except ValidationError as exc:
        err = validation_error_to_gateway(exc)
        err.message = err.message.replace("Invalid request body at '", f"Invalid request body at '{where}.")
        err.param = f"{where}.{err.param}" if err.param else where
        raise err from None


def _responses_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = []
    if req.instructions:
        msgs.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        msgs.append({"role": "user", "content": req.input})
        return msgs
    for i, item in enumerate(req.input):
        where = f"input.{i}"
        kind = item.get("type", "message")
        if kind == "message":
            m = _validate_item(_InputMessage, item, where)
            msgs.append({"role": m.role, "content": _content_text(m.content, where)})
        elif kind == "function_call":
            fc = _validate_item(_FunctionCallItem, item, where)
            call = _tool_call_dict(fc.call_id, fc.name, fc.arguments)
            last = msgs[-1] if msgs else None
            # A model turn is one assistant message: text then its calls (the Responses API splits them).
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                msgs.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            fo = _validate_item(_FunctionCallOutputItem, item, where)
            msgs.append({"role": "tool", "tool_call_id": fo.call_id, "content": _content_text(fo.output, where)})
        elif kind == "reasoning":
            continue  # reasoning summaries from other models carry nothing our engine can use
        else:
            raise invalid(f"Input item type '{kind}' is not supported by this gateway", f"{where}.type")
    if not msgs:
        raise invalid("'input' must not be empty", "input")
    return msgs


def _responses_tools(req: ResponsesRequest) -> list[dict[str, Any]]:
    tools = []
    for i, raw in enumerate(req.tools or []):
        if raw.get("type") != "function":
            raise invalid(f"Tool type '{raw.get('type')}' is not supported (only function tools)", f"tools.{i}.type")
        t = _validate_item(_ResponsesFunctionTool, raw, f"tools.{i}")
        fn = {"name": t.name, "parameters": t.parameters or {"type": "object", "properties": {}}}
        if t.description is not None:
            fn["description"] = t.description
        if t.strict is not None:
            fn["strict"] = t.strict
        tools.append({"type": "function", "function": fn})
    return tools


def _responses_tool_choice(choice: Union[str, dict[str, Any], None]) -> Any:
    if choice is None or isinstance(choice, str):
        if choice not in (None, "none", "auto", "required"):
            raise invalid(f"Unsupported tool_choice '{choice}'", "tool_choice")
        return choice
    if choice.get("type") == "function" and choice.get("name"):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise invalid("Unsupported tool_choice (use 'auto', 'none', 'required' or a function)", "tool_choice")


def responses_request_to_engine(req: ResponsesRequest, default_max_tokens: Optional[int] = None) -> ChatRequest:
    if req.previous_response_id:
        raise invalid(
            "previous_response_id is not supported: the gateway stores no conversation state; "
            "send the full input each call",
            "previous_response_id",
            "unsupported_parameter",
        )
    if req.conversation is not None:
        raise invalid("'conversation' is not supported; send the full input each call", "conversation")
    tools = _responses_tools(req)
    tool_choice = _responses_tool_choice(req.tool_choice)
    if not tools and tool_choice not in (None, "none", "auto"):
        raise invalid("'tool_choice' needs 'tools'", "tool_choice")
    kwargs: dict[str, Any] = dict(
        messages=_responses_messages(req),
        tools=tools,
        tool_choice=tool_choice if tools else None,
        model=req.model,
        **_sampling(req.temperature, req.top_p),
    )
    max_tokens = req.max_output_tokens or default_max_tokens
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    return _build(**kwargs)


# --------------------------------------------------------------------------- engine -> chat completion

TokenText = Any  # callable(int) -> str, see logprob_content


def new_chat_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


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


def chat_usage(result: ChatResult, choices: Optional[list[ChatChoice]] = None) -> dict[str, Any]:
    completion = sum(len(c.response_ids) for c in (choices if choices is not None else result.choices))
    prompt = len(result.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_message_out(choice: ChatChoice) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": choice.text, "refusal": None}
    if choice.tool_calls:
        msg["tool_calls"] = [_tool_call_dict(tc.id, tc.name, tc.arguments) for tc in choice.tool_calls]
        if not choice.text:
            msg["content"] = None  # what OpenAI sends for a pure tool-call turn
    return msg


def chat_choice_out(
    choice: ChatChoice, *, index: int, logprobs: bool, token_text: TokenText, token_ids: bool = False
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "index": index,
        "message": chat_message_out(choice),
        "finish_reason": choice.finish_reason,
        "logprobs": {"content": logprob_content(choice, token_text), "refusal": None} if logprobs else None,
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
    token_text: TokenText,
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


# --------------------------------------------------------------------------- engine -> Responses API


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def response_usage(result: ChatResult) -> dict[str, Any]:
    out_tokens = sum(len(c.response_ids) for c in result.choices)
    return {
        "input_tokens": len(result.prompt_ids),
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": out_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": len(result.prompt_ids) + out_tokens,
    }


def response_text_part(text: str, logprobs: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def response_output_items(
    choice: ChatChoice, *, msg_id: str, logprobs: bool, token_text: TokenText
) -> list[dict[str, Any]]:
    """Output items of one model turn: a message (if it has text or nothing else), then function calls."""
    items: list[dict[str, Any]] = []
    if choice.text or not choice.tool_calls:
        lps = logprob_content(choice, token_text) if logprobs else None
        items.append(
            {
                "id": msg_id,
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [response_text_part(choice.text, lps)],
            }
        )
    for tc in choice.tool_calls:
        items.append(
            {
                "id": f"fc_{uuid.uuid4().hex[:24]}",
                "type": "function_call",
                "status": "completed",
                "call_id": tc.id,
                "name": tc.name,
                "arguments": tc.arguments,
            }
        )
    return items


def response_object(
    req: ResponsesRequest,
    *,
    response_id: str,
    created_at: int,
    model: str,
    status: str,
    output: list[dict[str, Any]],
    usage: Optional[dict[str, Any]] = None,
    incomplete_reason: Optional[str] = None,
    error: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """A Responses API `response` body, echoing the request settings as OpenAI does."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": error,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "model": model,
        "output": output,
        "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "text": {"format": {"type": "text"}},
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
        "tools": req.tools or [],
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "truncation": "disabled",
        "usage": usage,
        "user": req.user,
        "metadata": req.metadata or {},
    }


def response_from_result(
    req: ResponsesRequest, result: ChatResult, *, response_id: str, created_at: int, token_text: TokenText
) -> dict[str, Any]:
    choice = result.choices[0]
    want_logprobs = "message.output_text.logprobs" in (req.include or []) or bool(req.top_logprobs)
    output = response_output_items(
        choice, msg_id=f"msg_{uuid.uuid4().hex[:24]}", logprobs=want_logprobs, token_text=token_text
    )
    incomplete = choice.finish_reason == "length"
    return response_object(
        req,
        response_id=response_id,
        created_at=created_at,
        model=result.model,
        status="incomplete" if incomplete else "completed",
        output=output,
        usage=response_usage(result),
        incomplete_reason="max_output_tokens" if incomplete else None,
    )


def now_s() -> int:
    return int(time.time())


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
