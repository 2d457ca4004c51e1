"""Every gateway failure as OpenAI's error body {"error": {message, type, param, code}}.

OpenAI SDKs turn that shape into typed exceptions (BadRequestError, APIError ...) and retry on
503 after `Retry-After`, so engine errors are mapped here once, by the engine error family,
whichever engine raised them and whichever API was called.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from pydantic import ValidationError
from starlette.responses import JSONResponse

from agentkiln.engine.errors import EngineError, EngineUnavailable

# An engine that timed out or whose connection broke without saying when to come back.
DEFAULT_RETRY_AFTER_S = 1.0


class GatewayError(Exception):
    """An error the gateway answers in OpenAI's JSON shape; `retry_after_s` adds a Retry-After header."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
        retry_after_s: Optional[float] = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> Optional[dict[str, str]]:
        if self.retry_after_s is None:
            return None
        return {"Retry-After": str(max(0, math.ceil(self.retry_after_s)))}  # whole seconds (RFC 9110)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers())


def invalid(message: str, param: Optional[str] = None, code: Optional[str] = None) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def store_missing() -> GatewayError:
    """A call that needs the store (recording, stored responses) on a gateway that has none."""
    return GatewayError(503, "No store is attached to this server", type="server_error", code="store_missing")


def engine_error(exc: BaseException) -> GatewayError:
    """What the client is told when the engine failed.

    An `EngineError` carries its own status and code (503 + Retry-After for `EngineUnavailable`);
    a timeout or broken connection that escaped an engine is treated as unavailable too; anything
    else is an engine bug, a 502.
    """
    message = f"Inference engine failed: {type(exc).__name__}: {exc}"
    if isinstance(exc, EngineError):
        status = exc.status_code
        return GatewayError(
            status,
            message,
            type="server_error" if status >= 500 else "invalid_request_error",
            code=exc.code,
            retry_after_s=exc.retry_after_s if isinstance(exc, EngineUnavailable) else None,
        )
    if isinstance(exc, (TimeoutError, ConnectionError)):  # asyncio.TimeoutError is TimeoutError
        return GatewayError(
            503, message, type="server_error", code=EngineUnavailable.code, retry_after_s=DEFAULT_RETRY_AFTER_S
        )
    return GatewayError(502, message, type="server_error", code=EngineError.code)


# --------------------------------------------------------------------------- request validation

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
