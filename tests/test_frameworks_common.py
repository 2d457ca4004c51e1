"""Harness for the framework example tests: a real server + gateway on loopback, a real runner.

Not a test module of its own (it defines no tests); the test_frameworks_*.py files import it.
Each run enqueues one task, runs an example agent with a thread-mode Runner until the queue is
empty and returns what the store holds, so the tests check exactly what training would read.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentkiln.engine.base import ChatRequest, Engine
from agentkiln.engine.chat.tool_parsers.hermes import parse_tool_calls
from agentkiln.models import Attempt, LLMEndpoint, ResourcesIn, Rollout, Span
from agentkiln.protocol import SpanAttrs, SpanNames
from agentkiln.runner.runner import Runner
from agentkiln.runner.worker import WorkerConfig
from agentkiln.server.app import create_app
from agentkiln.server.serve import ServerThread
from agentkiln.store.client import HttpStore
from agentkiln.store.memory import InMemoryStore
from tests.gateway_fakes import decode, tool_call_text

FAST = WorkerConfig(poll_interval_s=0.05, heartbeat_s=0.2, flush_interval_s=0.05, cancel_grace_s=0.5)
TASK = {"question": "What is 17 * 23?", "answer": "391"}
SYSTEM_SOLVER = "You solve arithmetic questions"  # start of examples.common.SYSTEM_PROMPT


@dataclass
class Run:
    """One finished rollout as stored: its attempt(s) and spans."""

    rollout: Rollout
    attempts: list[Attempt]
    spans: list[Span]

    @property
    def attempt(self) -> Attempt:
        return self.attempts[-1]

    @property
    def calls(self) -> list[Span]:
        return [s for s in self.spans if s.name == SpanNames.llm_call]

    @property
    def rewards(self) -> list[float]:
        return [s.attributes[SpanAttrs.reward_value] for s in self.spans if s.name == SpanNames.reward]

    @property
    def tool_spans(self) -> list[Span]:
        return [s for s in self.spans if s.name == SpanNames.tool]

    def agents(self) -> list[str | None]:
        return [s.attributes.get(SpanAttrs.agent_name) for s in self.calls]


class KilnServer:
    """create_app (store API + gateway) over an in-memory store, with `engine` attached
    (`app_options`: more create_app keywords, e.g. agent_names)."""

    def __init__(self, engine: Engine, **app_options: Any) -> None:
        app = create_app(InMemoryStore(sweep_interval_s=None), sweep_interval_s=0, **app_options)
        app.state.engine = engine
        self.engine = engine
        self._thread = ServerThread(app)
        self.url = self._thread.start()

    def stop(self) -> None:
        self._thread.stop()

    async def run(
        self, agent: Any, task: Any = TASK, *, sampling: dict[str, Any] | None = None, model: str = "kiln-model"
    ) -> Run:
        """Enqueue `task`, run `agent` on it through a real worker, return the stored result.

        `model` is the name the agent asks for (engines serve their own model whatever it is)."""
        async with HttpStore(self.url) as store:
            await store.add_resources(ResourcesIn(llms={"main": LLMEndpoint(model=model, sampling=sampling or {})}))
            rollout = await store.enqueue_rollout(task)
            runner = Runner(agent, self.url, n_workers=1, mode="thread", until_empty=True, config=FAST)
            assert await runner.arun() == 1
            return Run(
                await store.get_rollout(rollout.rollout_id),
                await store.query_attempts(rollout.rollout_id),
                await store.query_spans(rollout.rollout_id),
            )


def serving() -> Iterator[Any]:
    """Body of each test file's `kiln_server` fixture: `kiln_server(engine, **app_options)` starts a
    server, stopped at teardown."""
    started: list[KilnServer] = []

    def start(engine: Engine, **app_options: Any) -> KilnServer:
        started.append(KilnServer(engine, **app_options))
        return started[-1]

    yield start
    for server in started:
        server.stop()


# --------------------------------------------------------------------------- scripted policies


async def run_in_venv(
    server: KilnServer, kiln: Path, agent: str, env: dict[str, str], task: Any, sampling: dict[str, Any] | None = None
) -> Run:
    """Enqueue `task`, run `kiln run <agent>` with another venv's `kiln` (CrewAI, MetaGPT: pins of their
    own) until the queue is empty, as a user would start it; the Run is what the store then holds."""
    async with HttpStore(server.url) as store:
        await store.add_resources(ResourcesIn(llms={"main": LLMEndpoint(model="kiln-model", sampling=sampling or {})}))
        rollout = await store.enqueue_rollout(task)
        cmd = [str(kiln), "run", agent, "--server", server.url]
        cmd += ["-n", "1", "--until-empty", "--mode", "thread", "--heartbeat-s", "0.2"]
        proc = await asyncio.to_thread(
            subprocess.run,
            cmd,
            cwd=Path(__file__).resolve().parent.parent,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 0 and "1 attempt(s) run" in proc.stdout, proc.stdout + proc.stderr[-6000:]
        return Run(
            await store.get_rollout(rollout.rollout_id),
            await store.query_attempts(rollout.rollout_id),
            await store.query_spans(rollout.rollout_id),
        )


def last_tool_result(req: ChatRequest) -> str | None:
    last = req.messages[-1]
    return str(last.get("content")) if last.get("role") == "tool" else None


def system_text(req: ChatRequest) -> str:
    return " ".join(str(m.get("content")) for m in req.messages if m.get("role") in ("system", "developer"))


def solver_policy(expression: str = "17 * 23") -> Any:
    """Call calculate(expression) once, then state its result."""

    def policy(req: ChatRequest) -> str:
        result = last_tool_result(req)
        if result is not None:
            return f"The answer is {result}."
        if req.tools:
            return tool_call_text("calculate", {"expression": expression})
        return "I cannot use tools here."

    return policy


# --------------------------------------------------------------------------- checks


def assert_recorded(run: Run, n_calls: int, agent: str | None, reward: float) -> None:
    """The attempt succeeded; every LLM call has token ids, logprobs and the agent name; the reward is stored."""
    assert run.attempt.status.value == "succeeded", run.attempt.error
    assert len(run.calls) == n_calls, [s.attributes.get(SpanAttrs.response) for s in run.calls]
    for span in run.calls:
        attrs = span.attributes
        assert attrs[SpanAttrs.prompt_token_ids] and attrs[SpanAttrs.response_token_ids]
        assert len(attrs[SpanAttrs.response_logprobs]) == len(attrs[SpanAttrs.response_token_ids])
        if agent is not None:
            assert attrs[SpanAttrs.agent_name] == agent
    assert run.rewards == [reward]


def assert_continues(prev: Span, nxt: Span) -> None:
    """Multi-turn: the next call's prompt tokens hold what the previous call answered."""
    prompt = decode(nxt.attributes[SpanAttrs.prompt_token_ids])
    raw = decode(prev.attributes[SpanAttrs.response_token_ids])
    parsed = parse_tool_calls(raw, prev.attributes[SpanAttrs.request].get("tools"))
    if parsed.tool_calls:
        for call in parsed.tool_calls:
            assert json.dumps(call.name) in prompt
            for value in json.loads(call.arguments).values():
                assert json.dumps(value)[1:-1] in prompt
    else:
        assert json.dumps(raw.strip())[1:-1] in prompt
