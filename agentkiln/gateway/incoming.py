"""What a gateway request brings before any engine work: its JSON body and the agent named in its path."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Optional, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from agentkiln.gateway import limits
from agentkiln.gateway.errors import GatewayError, invalid, validation_error_to_gateway
from agentkiln.protocol import is_valid_agent_name

MAX_BODY_BYTES = 8_000_000

_Body = TypeVar("_Body", bound=BaseModel)


async def validated_body(request: Request, model: type[_Body]) -> _Body:
    """The JSON body parsed into `model`; invalid input becomes an OpenAI-shaped 4xx."""
    raw = await request.body()
    body = await read_json(request, raw)
    try:
        if len(raw) > limits.PARSE_OFF_LOOP_BYTES:  # a large body is validated off the event loop too
            return await asyncio.to_thread(model.model_validate, body)
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error_to_gateway(exc) from None


async def read_json(request: Request, raw: Optional[bytes] = None) -> dict[str, Any]:
    """The body as a JSON object, within the body-shape limits of `gateway.limits`."""
    if raw is None:
        raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise GatewayError(413, f"Request body too large ({len(raw)} bytes, limit {MAX_BODY_BYTES})")
    try:
        body = await limits.loads_async(raw)
    except limits.BodyRejected as exc:
        raise invalid(f"Request body rejected: {exc}", exc.param) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(f"Request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise invalid("Request body must be a JSON object")
    return body


def path_agent(request: Request) -> Optional[str]:
    """The agent name of an `/agent/{name}/v1` route (400 unless 1-128 chars of [A-Za-z0-9_.-])."""
    name = request.path_params.get("agent_name")
    if name is None:
        return None
    if not is_valid_agent_name(name):
        raise GatewayError(
            400,
            f"Invalid agent name {name[:200]!r}: use 1-128 characters of A-Z a-z 0-9 _ . -",
            param="agent_name",
            code="invalid_agent_name",
        )
    return name
