"""The one server-sent-events writer of both OpenAI APIs: event framing and the HTTP response.

A finished answer (the engine was done before the first byte went out) is sent as one plain
body: it gains nothing from chunked streaming, and skipping the streaming machinery (a task
group and one write per event) is most of what a fast upstream's stream costs here. A live
stream goes out chunked, one write per batch of ready events.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Iterable, Optional

from starlette.responses import Response, StreamingResponse

DONE = "data: [DONE]\n\n"  # chat completions' end of stream
_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_MEDIA_TYPE = "text/event-stream"


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def event(obj: Any, name: Optional[str] = None) -> str:
    """One SSE event: `data: <json>` (the Responses API also names it with `event:`)."""
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {dumps(obj)}\n\n"


def finished_response(events: Iterable[str]) -> Response:
    """Events that are all ready now, as one plain response."""
    return Response("".join(events).encode(), media_type=_MEDIA_TYPE, headers=_HEADERS)


async def sse_response(events: AsyncIterator[str], *, complete: bool) -> Response:
    """An event stream; `complete` (every event is ready now) sends all of it in one plain response."""
    if complete:
        return finished_response([e async for e in events])
    return StreamingResponse(events, media_type=_MEDIA_TYPE, headers=_HEADERS)
