"""The LLM an agent gets when no published resources name one: the server's own engine.

A fresh `kiln serve --engine tiny` has published nothing, yet its gateway serves a model: a
newcomer's `kiln run` / `kiln dev` should just work. The model name comes from the gateway's
`GET /v1/models` (looked up once per worker). Where the server has no engine (or cannot be
asked), `llm` is a `MissingLLM` whose every use raises one error saying what to publish, so an
agent that never calls an LLM still runs and one that does fails with a message, not
`'NoneType' object has no attribute 'for_agent'`.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

from agentkiln.protocol import auth_headers

logger = logging.getLogger(__name__)

_HOW_TO_FIX = (
    "start the server with an engine (`kiln serve --engine tiny|smollm2|upstream:<base_url>#<model>`) or publish "
    "resources naming an LLM (POST /api/v1/resources with llms={'main': {'model': ..., 'endpoint': ...}}, "
    "or `store.add_resources(ResourcesIn(llms={'main': LLMEndpoint(model=...)}))`)"
)


class NoLLMError(RuntimeError):
    """The agent used `llm`, but no resources name an LLM and the server serves none."""


class MissingLLM:
    """Stands in for `llm` when there is none: any attribute raises `NoLLMError` with the fix."""

    def __init__(self, why: str) -> None:
        self._why = why

    def __getattr__(self, name: str) -> NoReturn:
        if name.startswith("__"):
            raise AttributeError(name)
        raise NoLLMError(f"This agent uses `llm.{name}`, but there is no LLM: {self._why}; {_HOW_TO_FIX}")

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"MissingLLM({self._why!r})"


async def server_model(gateway_url: str, api_key: str | None, timeout_s: float = 10.0) -> tuple[str | None, str]:
    """(the model the server's gateway serves, or None; why not)."""
    import httpx

    url = gateway_url.rstrip("/") + "/v1/models"
    headers = auth_headers(api_key)
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            response = await client.get(url, headers=headers)
        response.raise_for_status()
        data = response.json().get("data") or []
    except (httpx.HTTPError, ValueError, AttributeError) as exc:  # the agent may not need an LLM: report only
        logger.warning("could not ask %s for its model: %r", url, exc)
        return None, f"no resources name an LLM and {url} could not be asked for its model ({exc!r})"
    if not data or not isinstance(data[0], dict) or not data[0].get("id"):
        return None, f"no resources name an LLM and the server at {gateway_url} has no engine"
    return str(data[0]["id"]), ""


def has_llm(llm: Any) -> bool:
    """Whether `llm` is a real handle (not None, not a MissingLLM)."""
    return llm is not None and not isinstance(llm, MissingLLM)
