"""What a gateway request brings before any engine work: its JSON body and the agent named in its path."""

from __future__ import annotations

import json
from typing import Any, Optional, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from agentkiln.gateway.errors import GatewayError, invalid, validation_error_to_gateway
from agentkiln.protocol import is_valid_agent_name

MAX_BODY_BYTES = 8_000_000

_Body = TypeVar("_Body", bound=BaseModel)


async def validated_body(request: Request, model: type[_Body]) -> _Body:
    """The JSON body parsed into `model`; invalid input becomes an OpenAI-shaped 4xx."""
    raw = await read_json(request)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise validation_error_to_gateway(exc) from None


async def read_json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise GatewayError(413, f"Request body too large ({len(raw)} bytes, limit {MAX_BODY_BYTES})")
    try:
        body = json.loads(raw)
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
