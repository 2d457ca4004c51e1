"""How user agents plug into the runner: the `@kiln.rollout` decorator and `kiln.Agent` class.

An agent is called once per attempt with whatever it asks for by parameter name:
`task` (the rollout input), `llm` (an LLMHandle whose base_url already points at this
attempt's gateway route, so every call is recorded for training), `llms` (all named
endpoints), `prompts` (name -> PromptTemplate), `resources`, `rollout`, `attempt`.
Sync agents run in a thread, async ones on the worker's event loop.

Return value: a number -> final reward; a dict of numbers -> multi-dimensional final
reward; None -> rewards were emitted with kiln.emit_reward; a list of SpanIn/dicts ->
spans to store; anything else is stored as a kiln.object span.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from agentkiln.models import Attempt, LLMEndpoint, PromptTemplate, Resources, Rollout
from agentkiln.protocol import validate_agent_name, with_agent
from agentkiln.runner import identity

logger = logging.getLogger(__name__)

INJECTABLE = ("task", "llm", "llms", "prompts", "resources", "rollout", "attempt")
PLACEHOLDER_API_KEY = "kiln"  # OpenAI clients refuse an empty key; the gateway checks its own




@dataclass
class LLMHandle:
    """The model an agent should call for this attempt (pass base_url/model/api_key to any OpenAI client).

    `agent` names the caller for multi-agent training (see `for_agent` and agentkiln.runner.identity).
    """

    base_url: str | None
    model: str
    api_key: str = field(default=PLACEHOLDER_API_KEY, repr=False)  # the attempt's token: never logged
    sampling: dict[str, Any] = field(default_factory=dict)
    name: str = "main"
    agent: str | None = None

    @classmethod
    def from_endpoint(cls, name: str, endpoint: LLMEndpoint, *, base_url: str | None, api_key: str | None) -> LLMHandle:
        handle = cls(
            base_url=base_url or endpoint.endpoint,
            model=endpoint.model,
            api_key=api_key or PLACEHOLDER_API_KEY,
            sampling=dict(endpoint.sampling),
            name=name,
        )
        # An endpoint naming one agent's weights: calls through it must be that agent's to be served them.
        return handle.for_agent(endpoint.agent) if endpoint.agent else handle

    def for_agent(self, agent: str) -> LLMHandle:
        """This handle with every call recorded under `agent`.

        On a kiln attempt URL the name goes into the path (`.../attempt/{aid}/agent/{agent}/v1`), so
        any client given this base_url is attributed, whatever framework built it. Other URLs (an
        upstream endpoint in dev) keep their base_url; the handle's own clients then send X-Kiln-Agent.
        """
        validate_agent_name(agent)
        return replace(self, base_url=with_agent(self.base_url, agent), agent=agent, sampling=dict(self.sampling))

    def http_client(self, **kwargs: Any) -> Any:
        """An httpx client for `openai.OpenAI(http_client=...)` / LangChain's `http_client` that sends X-Kiln-Agent.

        The name is this handle's `agent` or, per request, the enclosing `kiln.agent(...)` block's.
        """
        import openai

        return identity.add_request_hook(openai.DefaultHttpxClient(**kwargs), identity.sync_agent_hook(self.agent))

    def async_http_client(self, **kwargs: Any) -> Any:
        """Async twin of `http_client` (for `openai.AsyncOpenAI` / LangChain's `http_async_client`)."""
        import openai

        return identity.add_request_hook(
            openai.DefaultAsyncHttpxClient(**kwargs), identity.async_agent_hook(self.agent)
        )

    def openai(self, **kwargs: Any) -> Any:
        """A sync `openai.OpenAI` client bound to this attempt's endpoint, naming the calling agent."""
        import openai

        client = kwargs.pop("http_client", None)
        client = identity.add_request_hook(client, identity.sync_agent_hook(self.agent)) if client else None
        return openai.OpenAI(
            base_url=self.base_url, api_key=self.api_key, http_client=client or self.http_client(), **kwargs
        )

    def async_openai(self, **kwargs: Any) -> Any:
        """An `openai.AsyncOpenAI` client bound to this attempt's endpoint, naming the calling agent."""
        import openai

        client = kwargs.pop("http_client", None)
        client = identity.add_request_hook(client, identity.async_agent_hook(self.agent)) if client else None
        return openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self.api_key, http_client=client or self.async_http_client(), **kwargs
        )

    def chat_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """`model` plus the published sampling settings, for `client.chat.completions.create(**...)`."""
        return {"model": self.model, **self.sampling, **overrides}


@dataclass
class Invocation:
    """What one attempt offers the agent."""

    task: Any
    rollout: Rollout
    attempt: Attempt
    resources: Resources | None
    llm: LLMHandle | None
    llms: dict[str, LLMHandle]
    prompts: dict[str, PromptTemplate]
    server_url: str | None = None  # the kiln server (gateway, store API, OTLP intake), when known
    api_key: str | None = field(default=None, repr=False)  # this attempt's token (not the runner's key)

    def value(self, name: str) -> Any:
        return getattr(self, name)


def _plan_arguments(fn: Callable[..., Any], *, skip_self: bool = False) -> list[tuple[str, str, bool]]:
    """(parameter name, injected value name, keyword?) for each parameter of fn.

    Known names are injected; the first other positional parameter receives the task
    (so `def solve(question)` works); other parameters must have defaults.
    """
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    if skip_self and params:
        params = params[1:]
    plan: list[tuple[str, str, bool]] = []
    task_given = any(p.name == "task" for p in params)
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        keyword = p.kind == p.KEYWORD_ONLY
        if p.name in INJECTABLE:
            plan.append((p.name, p.name, keyword))
        elif not task_given and not keyword and p.default is p.empty:
            plan.append((p.name, "task", keyword))
            task_given = True
        elif p.default is p.empty:
            raise TypeError(
                f"{getattr(fn, '__qualname__', fn)}: parameter {p.name!r} has no default and is not one of "
                f"{', '.join(INJECTABLE)}"
            )
    return plan


def _call_args(plan: list[tuple[str, str, bool]], inv: Invocation) -> tuple[list[Any], dict[str, Any]]:
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for pname, source, keyword in plan:
        if keyword:
            kwargs[pname] = inv.value(source)
        else:
            args.append(inv.value(source))
    return args, kwargs


def _is_async(fn: Callable[..., Any]) -> bool:
    # Callable objects with `async def __call__` count as async too.
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


class BaseAgent:
    """What the worker runs: `call(invocation)` returns the agent's raw return value (or a coroutine)."""

    name: str = "agent"

    async def prepare(self) -> None:
        """Called by each worker before its first attempt (class agents run setup here)."""

    def entry(self) -> Callable[..., Any]:
        raise NotImplementedError

    def is_async(self) -> bool:
        return _is_async(self.entry())

    def call(self, inv: Invocation) -> Any:
        """Call the entry point (returns a coroutine for async agents)."""
        fn = self.entry()
        args, kwargs = _call_args(self._plan(), inv)
        return fn(*args, **kwargs)

    def _plan(self) -> list[tuple[str, str, bool]]:
        raise NotImplementedError


class FunctionAgent(BaseAgent):
    """A function made into an agent by `@kiln.rollout`; still callable directly."""

    def __init__(self, fn: Callable[..., Any], *, name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "agent")
        self.plan = _plan_arguments(fn)
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def entry(self) -> Callable[..., Any]:
        return self.fn

    def _plan(self) -> list[tuple[str, str, bool]]:
        return self.plan

    def __reduce__(self) -> Any:
        # Process runners pickle the agent; re-import it by name in the child.
        return (import_agent, (f"{self.fn.__module__}:{self.fn.__qualname__}",))

    def __repr__(self) -> str:
        return f"<kiln rollout agent {self.name}>"


def rollout(fn: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
    """Decorator turning `f(task, llm, prompts, ...)` (sync or async) into a kiln agent."""
    if fn is None:
        return lambda f: FunctionAgent(f, name=name)
    return FunctionAgent(fn, name=name)


class Agent(BaseAgent):
    """Class form: `setup(self)` runs once per worker process, `rollout(self, task, ...)` per attempt.

    Both may be sync or async. Put expensive state (clients, indexes, models) in setup;
    rollout is called concurrently when several workers share the process.
    """

    def setup(self) -> Any:
        """Override for once-per-process initialisation."""
        return None

    def rollout(self, task: Any) -> Any:  # pragma: no cover - abstract by convention
        raise NotImplementedError(f"{type(self).__name__} must define rollout(self, task, ...)")

    @property
    def name(self) -> str:  # type: ignore[override]
        return type(self).__name__

    def entry(self) -> Callable[..., Any]:
        return self.rollout

    def _plan(self) -> list[tuple[str, str, bool]]:
        plan = self.__dict__.get("_kiln_plan")
        if plan is None:
            plan = _plan_arguments(self.rollout)
            self.__dict__["_kiln_plan"] = plan
        return plan

    async def prepare(self) -> None:
        state = self.__dict__.setdefault("_kiln_setup", {"done": False, "lock": threading.Lock()})
        if state["done"]:
            return
        if inspect.iscoroutinefunction(self.setup):
            alock = self.__dict__.setdefault("_kiln_async_setup_lock", asyncio.Lock())
            async with alock:
                if not state["done"]:
                    await self.setup()
                    state["done"] = True
            return

        def run_setup() -> None:
            with state["lock"]:
                if not state["done"]:
                    self.setup()
                    state["done"] = True

        await asyncio.to_thread(run_setup)

    def __getstate__(self) -> dict[str, Any]:
        # Locks do not pickle; each process runs its own setup anyway.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_kiln_")}


def import_agent(ref: str) -> BaseAgent:
    """Load `module:attr` (dotted attr allowed) as an agent: a kiln agent, Agent subclass or plain function."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"agent reference must look like 'module:function' or 'module:Class', got {ref!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return as_agent(obj)


def as_agent(obj: Any) -> BaseAgent:
    if isinstance(obj, BaseAgent):
        return obj
    if isinstance(obj, type) and issubclass(obj, Agent):
        return obj()
    if callable(obj):
        return FunctionAgent(obj)
    raise TypeError(f"{obj!r} is not an agent (expected @kiln.rollout function, kiln.Agent subclass or callable)")
