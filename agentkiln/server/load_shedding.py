"""Sheds load past a bound on requests in flight: 503 with Retry-After, the connection kept.

uvicorn's own `limit_concurrency` counts open connections as well as requests, answers past it
with a plain-text 503 without Retry-After, and closes the connection. A thousand runners, each
holding a pooled keep-alive connection or two, cross it while idle, and every request on every
connection then fails and reconnects: the storm that failed the 1,000-runner shape. Here the
bound is on requests being served, the answer is the API's JSON error with Retry-After, and the
connection stays open for the client's retry; uvicorn's limit is kept as a far higher bound on
connections (file descriptors), see serve.py.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Receive, Scope, Send

from agentkiln.server.errors import send_error

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 1024
RETRY_AFTER_S = 1
_EXEMPT = frozenset({"/health"})  # liveness probes answer even when shedding


class LoadShedMiddleware:
    def __init__(self, app: ASGIApp, *, max_in_flight: int = MAX_IN_FLIGHT, retry_after_s: int = RETRY_AFTER_S):
        self.app = app
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.retry_after_s = retry_after_s
        self.shed = 0  # answers refused since start (its log line every 1,000)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _EXEMPT:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            self.shed += 1
            if self.shed == 1 or self.shed % 1000 == 0:
                log.warning("shedding load: %d requests in flight (%d refused so far)", self.in_flight, self.shed)
            message = f"server busy: over {self.max_in_flight} requests in flight; retry after {self.retry_after_s}s"
            await send_error(send, 503, "ServiceUnavailable", message, [(b"retry-after", str(self.retry_after_s).encode())])
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
