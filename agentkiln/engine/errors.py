"""One exception family for every engine (embedded or upstream), like httpx's.

The gateway maps these to HTTP answers without knowing which engine raised them:
`EngineUnavailable` (busy, overloaded, unreachable, timed out, upstream 429/503) is a retryable
503 with Retry-After; `EngineRequestError` is the client's fault (400); any other `EngineError`
is a 502. Anything an engine raises outside this family is a bug and also answers 502.
"""

from __future__ import annotations

from typing import Optional


class EngineError(RuntimeError):
    """Base of every error an engine reports on purpose."""

    status_code = 502
    code = "engine_error"
    retryable = False

    def __init__(self, message: str, *, upstream_status: Optional[int] = None) -> None:
        super().__init__(message)
        self.upstream_status = upstream_status


class EngineUnavailable(EngineError):
    """The engine cannot take the request now; the same request may succeed later (503)."""

    status_code = 503
    code = "engine_unavailable"
    retryable = True

    def __init__(
        self, message: str, *, retry_after_s: float = 1.0, upstream_status: Optional[int] = None
    ) -> None:
        super().__init__(message, upstream_status=upstream_status)
        self.retry_after_s = retry_after_s


class EngineRequestError(EngineError):
    """The request itself cannot be served (too long for the context, rejected by the upstream as invalid)."""

    status_code = 400
    code = "invalid_request"


class EngineResponseError(EngineError):
    """The engine answered something unusable (malformed upstream body, upstream 5xx other than 503)."""

    status_code = 502
    code = "engine_error"
