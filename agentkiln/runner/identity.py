"""Which agent of a multi-agent program is calling the model, so training can select agents by name.

Two ways to name the caller, both recorded by the gateway as `kiln.agent.name`:

* a per-agent base URL, `llm.for_agent("writer").base_url` ->
  `{server}/rollout/{rid}/attempt/{aid}/agent/writer/v1`. Works with every framework, because
  every framework lets each model client have its own base URL.
* `with kiln.agent("writer"): ...` sets a context variable; clients made by the runner's
  LLMHandle (`llm.openai()`, `llm.async_openai()`, `llm.http_client()`) send it as the
  X-Kiln-Agent header. Clients you build yourself do not see it: give them `for_agent`'s
  base URL, pass `http_client=llm.http_client()`, or set the X-Kiln-Agent header yourself.

The variable follows asyncio tasks and `contextvars.copy_context()` like any ContextVar; a plain
`threading.Thread` started inside the block does not inherit it.
"""

from __future__ import annotations

import contextvars
from types import TracebackType
from typing import Any

import httpx

from agentkiln.protocol import Headers, validate_agent_name

_current_agent: contextvars.ContextVar[str | None] = contextvars.ContextVar("kiln_agent", default=None)


def current_agent() -> str | None:
    """The name set by the innermost enclosing `kiln.agent(...)` block, or None."""
    return _current_agent.get()


class agent:  # lower case: used as `with kiln.agent("writer"):`, like a function
    """Context manager (sync or async) naming the agent whose LLM calls run inside it.

    Nested blocks override the outer name and restore it on exit.
    """

    def __init__(self, name: str) -> None:
        self.name = validate_agent_name(name)
        self._tokens: list[contextvars.Token[str | None]] = []

    def __enter__(self) -> str:
        self._tokens.append(_current_agent.set(self.name))
        return self.name

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        token = self._tokens.pop()
        try:
            _current_agent.reset(token)
        except ValueError:  # exited in another context than it was entered in
            _current_agent.set(None)

    async def __aenter__(self) -> str:
        return self.__enter__()

    async def __aexit__(self, *exc_info: object) -> None:
        self.__exit__(*exc_info)  # type: ignore[arg-type]


def _stamp(request: httpx.Request, fixed: str | None) -> None:
    name = fixed or _current_agent.get()
    if name and Headers.agent not in request.headers:
        request.headers[Headers.agent] = name


def sync_agent_hook(fixed: str | None = None) -> Any:
    """httpx request hook adding X-Kiln-Agent (`fixed`, else the current `kiln.agent` name)."""

    def hook(request: httpx.Request) -> None:
        _stamp(request, fixed)

    return hook


def async_agent_hook(fixed: str | None = None) -> Any:
    """Async twin of `sync_agent_hook` (httpx.AsyncClient awaits its hooks)."""

    async def hook(request: httpx.Request) -> None:
        _stamp(request, fixed)

    return hook


def add_request_hook(client: Any, hook: Any) -> Any:
    """Append `hook` to an httpx client's request hooks, keeping the ones it already has."""
    hooks = dict(client.event_hooks)
    hooks["request"] = [*hooks.get("request", []), hook]
    client.event_hooks = hooks
    return client
