"""`POST /v1/chat/completions`: whole answers, live streams, and finished results sent as chunks."""

from __future__ import annotations

from typing import Any, AsyncIterator, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from agentkiln.engine.base import ChatChoice, ChatResult
from agentkiln.gateway import sse
from agentkiln.gateway.call import GatewayCall, Serving
from agentkiln.gateway.chat_completions.protocol import (
    ROLE_DELTA,
    ChatCompletionRequest,
    buffered_chunks,
    chat_chunk,
    chat_completion_out,
    chat_request_to_engine,
    chat_usage,
    chunk_choice,
    new_chat_id,
)
from agentkiln.gateway.errors import GatewayError
from agentkiln.gateway.incoming import validated_body
from agentkiln.gateway.wire import now_s


class ChatCompletionsServing(Serving):
    async def __call__(self, request: Request) -> Response:
        body = await validated_body(request, ChatCompletionRequest)
        engine_req = chat_request_to_engine(body, self.default_max_tokens(request))
        call_id, created = new_chat_id(), now_s()
        call = await GatewayCall.start(request, self.deps, body, engine_req, api="chat.completions", call_id=call_id)
        want_lp, want_ids = bool(body.logprobs), bool(body.return_token_ids)

        def body_for(result: ChatResult, choices: Optional[list[ChatChoice]] = None) -> dict[str, Any]:
            return chat_completion_out(
                result, completion_id=call_id, created=created, logprobs=want_lp, token_text=call.token_text,
                choices=choices, token_ids=want_ids,
            )  # fmt: skip

        async def finish(result: ChatResult, full: Optional[dict[str, Any]] = None) -> None:
            def for_choice(i: int) -> dict[str, Any]:
                if full is not None and len(result.choices) == 1:
                    return full  # the answer itself: build it once
                return body_for(result, [result.choices[i]])

            await call.record(result, for_choice)

        if not body.stream:
            result = await call.chat()
            answer = body_for(result)
            await finish(result, answer)
            return JSONResponse(answer)

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(choices: list[dict[str, Any]], usage: Any = None) -> dict[str, Any]:
            return chat_chunk(call_id, created, call.model, choices, usage, with_usage=include_usage)

        # Tool calls are only known once the whole turn is parsed, and per-token logprobs only at the end,
        # so those cases (and n > 1) stream the finished result as chunks.
        if engine_req.n > 1 or engine_req.tools or want_lp:
            result = await call.chat()
            await finish(result)
            return sse.finished_response(buffered_chunks(result, chunk, include_usage, want_lp, call.token_text))
        complete = await call.open_stream()

        async def events() -> AsyncIterator[str]:
            # What is ready goes out in one write: the role chunk with the first text, the last
            # text with the finish chunk, usage and [DONE].
            out = sse.event(chunk([chunk_choice(0, dict(ROLE_DELTA))]))
            try:
                async for text, result in call.deltas():
                    if text:
                        out += sse.event(chunk([chunk_choice(0, {"content": text})]))
                    if result is not None:
                        await finish(result)
                        out += sse.event(chunk([chunk_choice(0, {}, result.choices[0].finish_reason)]))
                        if include_usage:
                            out += sse.event(chunk([], chat_usage(result)))
                        out += sse.DONE
                    yield out
                    out = ""
            except GatewayError as err:
                yield out + sse.event(err.body())

        return await sse.sse_response(events(), complete=complete)
