"""`POST /v1/responses`: whole answers, live streams, and finished results sent as the full event sequence."""

from __future__ import annotations

from typing import Any, AsyncIterator, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from agentkiln.engine.base import ChatResult
from agentkiln.gateway import sse
from agentkiln.gateway.call import GatewayCall, Serving
from agentkiln.gateway.errors import GatewayError
from agentkiln.gateway.incoming import validated_body
from agentkiln.gateway.responses.protocol import (
    LOGPROBS_INCLUDE,
    ResponseEvents,
    ResponsesRequest,
    new_message_id,
    new_response_id,
    response_from_result,
    responses_request_to_engine,
)
from agentkiln.gateway.responses.state import ResponseStates, caller_owner, request_items, with_ids
from agentkiln.gateway.wire import now_s


class ResponsesServing(Serving):
    def __init__(self, deps: Any, states: Optional[ResponseStates] = None) -> None:
        super().__init__(deps)
        self.states = states if states is not None else ResponseStates()

    async def __call__(self, request: Request) -> Response:
        body = await validated_body(request, ResponsesRequest)
        prior: list[dict[str, Any]] = []
        if body.previous_response_id:  # 404 unless stored (and, for an attempt token, its own)
            store = self.deps.get_store(request)
            rec = await self.states.get(store, body.previous_response_id, caller_owner(request), "previous_response_id")
            prior = rec.conversation
        engine_req = responses_request_to_engine(body, self.default_max_tokens(request), prior)
        response_id, created = new_response_id(), now_s()
        call = await GatewayCall.start(request, self.deps, body, engine_req, api="responses", call_id=response_id)

        async def finish(result: ChatResult, msg_id: Optional[str] = None) -> dict[str, Any]:
            """The response body, built once for the client, the span and the conversation state."""
            final = response_from_result(
                body, result, response_id=response_id, created_at=created, token_text=call.token_text, msg_id=msg_id
            )
            await call.record(result, lambda i: final)
            if body.store is not False:
                own = with_ids(request_items(body.input))
                owner = (call.target.rollout_id, call.target.attempt_id)
                store = self.deps.get_store(request)
                await self.states.put(store, final, own, [*prior, *own, *final["output"]], owner)
            return final

        if not body.stream:
            return JSONResponse(await finish(await call.chat()))

        ev = ResponseEvents(body, response_id, created, call.model)
        if engine_req.tools or LOGPROBS_INCLUDE in (body.include or []):
            final = await finish(await call.chat())
            return sse.finished_response(ev.buffered(final))
        complete = await call.open_stream()

        async def events() -> AsyncIterator[str]:
            msg_id = new_message_id()  # the streamed message keeps this id in the final response
            out = ev.start() + ev.message_added(msg_id, 0)  # goes out with the first text
            try:
                async for text, result in call.deltas():
                    if text:
                        out += ev.text_delta(msg_id, 0, text)
                    if result is not None:
                        final = await finish(result, msg_id)
                        out += ev.items_done(final) + ev.end(final)
                    yield out
                    out = ""
            except GatewayError as err:
                yield out + ev.error(err)

        return await sse.sse_response(events(), complete=complete)
