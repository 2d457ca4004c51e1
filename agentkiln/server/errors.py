"""Error shape and guards of the server: every failure a client can cause is a 4xx JSON body.

All errors look like {"error": {"type": ..., "message": ...}} so the HTTP client can map
them back to the StoreError it came from, and so a human reading curl output sees which
field was wrong. The guards (API key, body size) are plain ASGI middleware so they run
before any route (gateway, OTLP intake, dashboard) parses a byte.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentkiln.store.base import StoreError

log = logging.getLogger(__name__)

_STATUS_TYPES = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    413: "PayloadTooLarge",
    415: "UnsupportedMediaType",
    422: "ValidationError",
    429: "TooManyRequests",
    503: "ServiceUnavailable",
}

_STATUS_MEANINGS = {
    400: "malformed JSON body or request",
    401: "missing or invalid API key or token",
    403: "the key or token may not do this",
    404: "unknown id (rollout, attempt, resources) or route",
    409: "the change is not allowed in the current state (e.g. a finished rollout)",
    413: "request body over the server's limit",
    415: "request body is not JSON (send Content-Type: application/json)",
    422: "a field is missing, of the wrong type or out of range (the message names it)",
    429: "too many requests: retry after the Retry-After header",
    503: "server at its concurrency limit or shutting down: retry",
}


def error_body(type_: str, message: str) -> dict[str, Any]:
    return {"error": {"type": type_, "message": message}}


def error_response(status_code: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(type_, message), status_code=status_code, headers=headers)


class ErrorDetail(BaseModel):
    type: str = Field(description="error class, e.g. NotFoundError, ValidationError, MalformedJSON")
    message: str = Field(description="what was wrong, naming the field or id")


class ErrorBody(BaseModel):
    """The body of every 4xx/5xx answer."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for these statuses, each with the error body."""
    return {status: {"model": ErrorBody, "description": _STATUS_MEANINGS[status]} for status in statuses}


def _loc(loc: Iterable[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        where, rest = parts[0], parts[1:]
        return f"{where} field '{'.'.join(rest)}'" if rest else where
    return ".".join(parts) or "request"


def format_validation_errors(errors: Iterable[dict[str, Any]]) -> tuple[str, bool]:
    """One readable line per problem; also says whether the body was not JSON at all."""
    lines: list[str] = []
    malformed = False
    for err in errors:
        if err.get("type") == "json_invalid":
            malformed = True
            pos = list(err.get("loc", ()))[-1:]
            detail = (err.get("ctx") or {}).get("error", "invalid JSON")
            lines.append(f"malformed JSON body at position {pos[0] if pos else '?'}: {detail}")
            continue
        line = f"{_loc(err.get('loc', ()))}: {err.get('msg', 'invalid')}"
        if tuple(err.get("loc", ())) == ("body",):
            line += " (send a JSON body with Content-Type: application/json)"
        lines.append(line)
    return "; ".join(lines) or "invalid request", malformed


async def _store_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StoreError)
    return error_response(exc.status_code, type(exc).__name__, str(exc) or type(exc).__name__)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, malformed = format_validation_errors(exc.errors())
    if malformed:
        return error_response(400, "MalformedJSON", message)
    return error_response(422, "ValidationError", message)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:
        allowed = _allowed_methods(request)
        message = f"{request.method} is not allowed on {request.url.path}; allowed: {', '.join(allowed)}"
        headers = {**(headers or {}), "Allow": ", ".join(allowed)}
    return error_response(exc.status_code, _STATUS_TYPES.get(exc.status_code, "HTTPError"), message, headers)


def _leaf_routes(routes: Iterable[Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """(path prefix, route) for every route, through included routers (FastAPI keeps them nested)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _leaf_routes(inner.routes, prefix + (getattr(route.include_context, "prefix", "") or ""))
        else:
            yield prefix, route


def _allowed_methods(request: Request) -> list[str]:
    """The methods of the resource at this path (Starlette's 405 names only its first route's).

    A literal path beats a template that would also match it: /rollouts/batch takes POST
    only, although GET /rollouts/{rollout_id} would read "batch" as an id.
    """
    path = request.url.path
    by_template: dict[str, set[str]] = {}
    for prefix, route in _leaf_routes(request.app.router.routes):
        regex, methods = getattr(route, "path_regex", None), getattr(route, "methods", None)
        if regex is None or not methods or not path.startswith(prefix):
            continue
        if regex.match(path[len(prefix) :]):
            by_template.setdefault(prefix + route.path, set()).update(methods)
    if not by_template:
        return []
    literal = min(by_template, key=lambda template: template.count("{"))
    return sorted(by_template[literal])


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StoreError, _store_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)


# --------------------------------------------------------------------------- ASGI guards


async def send_error(
    send: Send, status: int, type_: str, message: str, extra: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    body = json.dumps(error_body(type_, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyTooLarge(StarletteHTTPException):
    """Raised from receive() so FastAPI re-raises it (it passes HTTPExceptions through untouched)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


class _ResponseWatch:
    """Wraps an ASGI `send` to tell whether the response has started (then no error body can follow)."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


class BodyLimitMiddleware:
    """413 on a declared Content-Length over the limit, and on streamed (chunked) bodies that grow past it."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await send_error(send, 400, "BadRequest", "invalid Content-Length header")
                    return
                if declared > limit:
                    await send_error(send, 413, "PayloadTooLarge", f"request body larger than {limit} bytes")
                    return
        received = 0
        response = _ResponseWatch(send)

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, counting_receive, response.send)
        except BodyTooLarge:
            # A route that read the body outside FastAPI's handler chain (raw ASGI) lands here.
            if not response.started:
                await send_error(send, 413, "PayloadTooLarge", f"request body larger than {limit} bytes")


class UnexpectedErrorMiddleware:
    """Turns a bug in any route into a logged 500 JSON answer; the server keeps serving.

    Done here rather than with an `Exception` handler because Starlette re-raises those
    after answering, which logs every failure twice.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response = _ResponseWatch(send)
        try:
            await self.app(scope, receive, response.send)
        except Exception as exc:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if response.started:
                raise
            await send_error(send, 500, "InternalError", f"{type(exc).__name__}: {exc}")
