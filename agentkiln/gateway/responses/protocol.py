"""Responses API wire bodies: the request models, their engine request, the response body and its stream events."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Iterator, Literal, Optional, Union

from pydantic import BaseModel, Field, ValidationError

from agentkiln.engine.base import ChatChoice, ChatRequest, ChatResult
from agentkiln.gateway import limits, sse, structured, wire
from agentkiln.gateway.errors import GatewayError, invalid, validation_error_to_gateway

LOGPROBS_INCLUDE = "message.output_text.logprobs"

# --------------------------------------------------------------------------- request


class ResponsesRequest(wire.Tolerant):
    model: Optional[str] = None
    input: Union[str, Annotated[list[dict[str, Any]], Field(max_length=limits.MAX_MESSAGES)]]
    instructions: Optional[str] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    max_output_tokens: Optional[int] = Field(default=None, ge=1, le=limits.MAX_TOKENS)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    stream: Optional[bool] = None
    previous_response_id: Optional[str] = None
    conversation: Optional[Any] = None
    include: Optional[list[str]] = None
    metadata: Optional[dict[str, Any]] = None
    user: Optional[str] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    text: Optional[dict[str, Any]] = Field(default=None, description="text.format: text / json_object / json_schema")
    store: Optional[bool] = None  # None: stored, as in OpenAI (see responses/state.py)


class _InputMessage(wire.Tolerant):
    type: Optional[Literal["message"]] = None
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[wire.ContentPart]]


class _FunctionCallItem(wire.Tolerant):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str = ""


class _FunctionCallOutputItem(wire.Tolerant):
    type: Literal["function_call_output"]
    call_id: str
    output: Union[str, list[wire.ContentPart]]


class _ResponsesFunctionTool(wire.Tolerant):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=256)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


def _validate_item(model: type[BaseModel], item: dict[str, Any], where: str) -> Any:
    """Items of `input`/`tools` are validated one by one, so an error names the item's path."""
    try:
        return model.model_validate(item)
    except ValidationError as exc:
        err = validation_error_to_gateway(exc)
        err.message = err.message.replace("Invalid request body at '", f"Invalid request body at '{where}.")
        err.param = f"{where}.{err.param}" if err.param else where
        raise err from None


def _responses_messages(req: ResponsesRequest, prior: Optional[list[dict[str, Any]]] = None) -> list[dict[str, Any]]:
    """Chat messages of the instructions, the `prior` conversation items (previous_response_id), then `input`."""
    msgs: list[dict[str, Any]] = []
    if req.instructions:
        msgs.append({"role": "system", "content": req.instructions})
    own = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    items = [(f"previous_response_id.{i}", it) for i, it in enumerate(prior or [])]
    items += [(f"input.{i}", it) for i, it in enumerate(own)]
    for where, item in items:
        kind = item.get("type", "message")
        if kind == "message":
            m = _validate_item(_InputMessage, item, where)
            msgs.append({"role": m.role, "content": wire.content_text(m.content, where)})
        elif kind == "function_call":
            fc = _validate_item(_FunctionCallItem, item, where)
            call = wire.tool_call_dict(fc.call_id, fc.name, fc.arguments)
            last = msgs[-1] if msgs else None
            # A model turn is one assistant message: text then its calls (the Responses API splits them).
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                msgs.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            fo = _validate_item(_FunctionCallOutputItem, item, where)
            msgs.append({"role": "tool", "tool_call_id": fo.call_id, "content": wire.content_text(fo.output, where)})
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


def responses_request_to_engine(
    req: ResponsesRequest, default_max_tokens: Optional[int] = None, prior: Optional[list[dict[str, Any]]] = None
) -> ChatRequest:
    """`prior`: the conversation `previous_response_id` names (its items come before `input`)."""
    if req.conversation is not None:
        raise invalid("'conversation' is not supported; send the full input each call", "conversation")
    tools = _responses_tools(req)
    tool_choice = _responses_tool_choice(req.tool_choice)
    if not tools and tool_choice not in (None, "none", "auto"):
        raise invalid("'tool_choice' needs 'tools'", "tool_choice")
    max_tokens = req.max_output_tokens or default_max_tokens
    limits.check_generation(1, max_tokens, param="max_output_tokens")
    messages = _responses_messages(req, prior)
    limits.check_prompt_size(messages, tools, "input")
    return wire.engine_request(
        max_tokens,
        messages=messages,
        tools=tools,
        tool_choice=tool_choice if tools else None,
        model=req.model,
        structured=structured.responses_text_format(req.text),
        passthrough=structured.responses_passthrough(req),
        **wire.sampling(req.temperature, req.top_p),
    )


# --------------------------------------------------------------------------- response


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


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
    choice: ChatChoice, *, msg_id: str, logprobs: bool, token_text: wire.TokenText
) -> list[dict[str, Any]]:
    """Output items of one model turn: a message (if it has text or nothing else), then function calls."""
    items: list[dict[str, Any]] = []
    if choice.text or not choice.tool_calls:
        lps = wire.logprob_content(choice, token_text) if logprobs else None
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
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": None, "summary": None},
        "store": req.store is not False,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "text": {"format": (req.text or {}).get("format") or {"type": "text"}},
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
        "tools": req.tools or [],
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "truncation": "disabled",
        "usage": usage,
        "user": req.user,
        "metadata": req.metadata or {},
    }


def response_from_result(
    req: ResponsesRequest,
    result: ChatResult,
    *,
    response_id: str,
    created_at: int,
    token_text: wire.TokenText,
    msg_id: Optional[str] = None,
) -> dict[str, Any]:
    """The `response` body of a finished call; `msg_id` keeps the id a stream already announced."""
    choice = result.choices[0]
    want_logprobs = LOGPROBS_INCLUDE in (req.include or []) or bool(req.top_logprobs)
    output = response_output_items(
        choice, msg_id=msg_id or new_message_id(), logprobs=want_logprobs, token_text=token_text
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


# --------------------------------------------------------------------------- stream events


class ResponseEvents:
    """Builds the Responses API event sequence (what the openai SDK and openai-agents parse)."""

    def __init__(self, req: ResponsesRequest, response_id: str, created: int, model: str) -> None:
        self.req = req
        self.response_id = response_id
        self.created = created
        self.model = model
        self.seq = 0

    def _event(self, type_: str, **fields: Any) -> str:
        data = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return sse.event(data, type_)

    def _shell(self, status: str) -> dict[str, Any]:
        return response_object(
            self.req, response_id=self.response_id, created_at=self.created, model=self.model, status=status, output=[]
        )

    def start(self) -> str:
        return self._event("response.created", response=self._shell("in_progress")) + self._event(
            "response.in_progress", response=self._shell("in_progress")
        )

    def message_added(self, msg_id: str, index: int) -> str:
        item = {"id": msg_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}
        return self._event("response.output_item.added", output_index=index, item=item) + self._event(
            "response.content_part.added",
            item_id=msg_id,
            output_index=index,
            content_index=0,
            part=response_text_part(""),
        )

    def text_delta(self, msg_id: str, index: int, text: str) -> str:
        return self._event(
            "response.output_text.delta", item_id=msg_id, output_index=index, content_index=0, delta=text, logprobs=[]
        )

    def message_done(self, item: dict[str, Any], index: int) -> str:
        part = item["content"][0]
        return (
            self._event(
                "response.output_text.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                text=part["text"],
                logprobs=part.get("logprobs", []),
            )
            + self._event(
                "response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part
            )
            + self._event("response.output_item.done", output_index=index, item=item)
        )

    def function_call(self, item: dict[str, Any], index: int) -> str:
        added = {**item, "status": "in_progress", "arguments": ""}
        return (
            self._event("response.output_item.added", output_index=index, item=added)
            + self._event(
                "response.function_call_arguments.delta",
                item_id=item["id"],
                output_index=index,
                delta=item["arguments"],
            )
            + self._event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                name=item["name"],
                arguments=item["arguments"],
            )
            + self._event("response.output_item.done", output_index=index, item=item)
        )

    def items_done(self, final: dict[str, Any]) -> str:
        """The closing events of every output item of the finished response (the message was announced)."""
        return "".join(
            self.message_done(item, i) if item["type"] == "message" else self.function_call(item, i)
            for i, item in enumerate(final["output"])
        )

    def end(self, final: dict[str, Any]) -> str:
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        return self._event(kind, response=final)

    def buffered(self, final: dict[str, Any]) -> Iterator[str]:
        """A finished response as the whole event sequence."""
        yield self.start()
        for i, item in enumerate(final["output"]):
            if item["type"] == "message":
                yield self.message_added(item["id"], i)
                text = item["content"][0]["text"]
                if text:
                    yield self.text_delta(item["id"], i, text)
                yield self.message_done(item, i)
            else:
                yield self.function_call(item, i)
        yield self.end(final)

    def error(self, err: GatewayError) -> str:
        failed = self._shell("failed")
        failed["error"] = {"code": err.code or "server_error", "message": err.message}
        return self._event("error", code=err.code, message=err.message, param=err.param) + self._event(
            "response.failed", response=failed
        )
