"""Strict JSON request bodies: JSON media type only, finite numbers, bounded nesting.

Python's json module (what FastAPI parses bodies with) accepts NaN and Infinity, which are not
JSON and which the server could not write back out; lone surrogates ("\\ud800"), which SQLite
refuses; and nesting as deep as the stack allows, ending in a RecursionError (a 500). orjson
refuses the first two and anything over 1024 levels; the depth limit here is checked after it.
`JsonBodyRoute` applies this to every route with a body model and answers a body sent with
another Content-Type with 415, so a form post or a text body never reaches a model as bytes.
"""

from __future__ import annotations

import email.message
import json
from typing import Any, Callable, Coroutine

import orjson
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from agentkiln.server.errors import error_response

# Far deeper than any real input, rollout metadata or span attribute; shallow enough to walk cheaply.
MAX_JSON_DEPTH = 64
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class BodyProblem(Exception):
    """A body that is refused before any model sees it: (status, error type, message)."""

    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message


def is_json_media(content_type: str) -> bool:
    """application/json or application/*+json (any parameters, such as charset)."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def _too_deep(value: Any, max_depth: int) -> bool:
    """Whether containers nest more than max_depth levels (iterative: deep input cannot recurse)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _refuse_constant(name: str) -> Any:
    raise BodyProblem(422, "ValidationError", f"body: {name} is not a JSON number; send finite numbers only")


def _explain(body: bytes, exc: orjson.JSONDecodeError) -> BodyProblem:
    """orjson says "unexpected character" (or "no digit after sign") for NaN: find out whether that is what it met."""
    if "depth limit" in exc.msg:
        return BodyProblem(422, "ValidationError", f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    if "infinity" in exc.msg:
        return BodyProblem(422, "ValidationError", f"body: a number at position {exc.pos} is out of range")
    try:
        json.loads(body, parse_constant=_refuse_constant)
    except BodyProblem as problem:
        return problem
    except (ValueError, RecursionError):
        pass
    return BodyProblem(400, "MalformedJSON", f"malformed JSON body at position {exc.pos}: {exc.msg}")


def parse_json(body: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The body's value, or BodyProblem: 400 for malformed JSON, 422 for NaN/Infinity or too deep."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _explain(body, exc) from None
    if _too_deep(value, max_depth):
        raise BodyProblem(422, "ValidationError", f"body: JSON nested deeper than {max_depth} levels")
    return value


class _StrictRequest(Request):
    """A request whose .json() is parse_json (FastAPI calls it for JSON bodies)."""

    _strict_json: Any

    async def json(self) -> Any:
        if not hasattr(self, "_strict_json"):
            self._strict_json = parse_json(await self.body())
        return self._strict_json


def media_type_problem(content_type: str) -> BodyProblem:
    got = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
    return BodyProblem(
        415, "UnsupportedMediaType", f"request body must be JSON (Content-Type: application/json), got {got}"
    )


class JsonBodyRoute(APIRoute):
    """APIRoute whose body, when the route takes one, must be strict JSON (see the module doc)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def strict_handler(request: Request) -> Response:
            strict = _StrictRequest(request.scope, request.receive)
            if strict.method in _BODY_METHODS:
                body = await strict.body()
                try:
                    if body:
                        content_type = strict.headers.get("content-type", "")
                        if not is_json_media(content_type):
                            raise media_type_problem(content_type)
                        await strict.json()
                except BodyProblem as problem:
                    return error_response(problem.status, problem.type, problem.message)
            return await handler(strict)

        return strict_handler
