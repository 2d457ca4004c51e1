"""Sidecar agents: run any command (any language) per rollout, wired up through env vars.

The program needs no kiln library: it reads the task (stdin or $KILN_TASK), calls the model
through $OPENAI_BASE_URL (this attempt's gateway route, so its calls are recorded), and
reports the reward by printing a line `KILN_REWARD=<float>` (or a JSON object of named
dimensions). It may also POST spans to $KILN_SERVER_URL/api/v1/spans or export
OpenTelemetry traces (the standard OTEL_* variables are set for it), and name its failure
kind with a line `KILN_FAILURE=<kind>` before exiting nonzero.

Nonzero exit -> agent_exception (or the named kind) with the stderr tail as message; on
timeout/cancellation the whole process group is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

from agentkiln.models import FailureKind
from agentkiln.protocol import OTLP_TRACES_PATH, EnvVars, SpanAttrs, SpanNames
from agentkiln.runner import emit
from agentkiln.runner.agent import BaseAgent, Invocation
from agentkiln.runner.failures import KilnFailure
from agentkiln.runner.server_llm import has_llm

logger = logging.getLogger(__name__)

REWARD_PREFIX = "KILN_REWARD="
FAILURE_PREFIX = "KILN_FAILURE="
MAX_ENV_TASK_BYTES = 100_000  # Linux caps one env string at 128 KiB; stdin always has the task
TAIL_CHARS = 4_000


class SidecarError(KilnFailure):
    """The command exited nonzero; kind is agent_exception unless it printed KILN_FAILURE=<kind>."""

    def __init__(self, message: str, kind: FailureKind = FailureKind.agent_exception):
        super().__init__(message)
        self.kind = kind


def sidecar_env(inv: Invocation) -> dict[str, str]:
    """The variables a sidecar program gets for one attempt."""
    rid, aid = inv.rollout.rollout_id, inv.attempt.attempt_id
    task_json = json.dumps(emit.to_jsonable(inv.task))
    env = {
        EnvVars.rollout_id: rid,
        EnvVars.attempt_id: aid,
        EnvVars.attempt_number: str(inv.attempt.sequence_id),
    }
    if len(task_json.encode()) <= MAX_ENV_TASK_BYTES:
        env[EnvVars.task] = task_json
    if has_llm(inv.llm):
        if inv.llm.base_url:
            env[EnvVars.openai_base_url] = inv.llm.base_url
        env[EnvVars.openai_api_key] = inv.llm.api_key
        env[EnvVars.model] = inv.llm.model
        if inv.llm.sampling:
            env[EnvVars.sampling] = json.dumps(inv.llm.sampling)
    if inv.prompts:
        env[EnvVars.prompts] = json.dumps({k: v.template for k, v in inv.prompts.items()})
    if inv.server_url:
        env[EnvVars.server_url] = inv.server_url
        env[EnvVars.otel_traces_endpoint] = inv.server_url.rstrip("/") + OTLP_TRACES_PATH
        env[EnvVars.otel_traces_protocol] = "http/protobuf"
        env[EnvVars.otel_resource_attributes] = (
            f"{SpanAttrs.rollout_id}={quote(rid)},{SpanAttrs.attempt_id}={quote(aid)}"
        )
    if inv.api_key:
        env[EnvVars.api_key] = inv.api_key
        env[EnvVars.otel_traces_headers] = f"Authorization=Bearer%20{quote(inv.api_key)}"
    return env


# What a program needs to start and find its tools; the runner's keys and secrets stay out.
BASE_ENV = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "TERM",
            "PYTHONPATH", "VIRTUAL_ENV", "SYSTEMROOT")  # fmt: skip


def base_env(pass_env: Sequence[str] = ()) -> dict[str, str]:
    """The runner's variables a sidecar inherits: BASE_ENV plus the names the user lists."""
    return {name: os.environ[name] for name in (*BASE_ENV, *pass_env) if name in os.environ}


def parse_reward(text: str) -> float | dict[str, float]:
    text = text.strip()
    if text.startswith("{"):
        data = json.loads(text)
        return {str(k): float(v) for k, v in data.items()}
    return float(text)


class CommandAgent(BaseAgent):
    """Agent that runs `command` once per attempt (a shell string, or an argv list run without a shell).

    The program sees BASE_ENV, the variables named in `pass_env`, `env`, and the attempt's
    own variables (sidecar_env): its OpenAI key is the attempt's token, never the runner's key.
    """

    def __init__(
        self,
        command: str | Sequence[str],
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        pass_env: Sequence[str] = (),
        kill_grace_s: float = 2.0,
        on_line: Callable[[str], None] | None = None,
    ):
        self.command = command
        self.cwd = cwd
        self.env = dict(env or {})
        self.pass_env = tuple(pass_env)
        self.kill_grace_s = kill_grace_s
        self.on_line = on_line
        self.name = command if isinstance(command, str) else shlex.join(command)

    def is_async(self) -> bool:
        return True

    def call(self, inv: Invocation) -> Any:
        return self.run(inv)

    async def run(self, inv: Invocation) -> float | dict[str, float] | None:
        # A minimal environment: never the runner's own keys (the attempt's token comes from sidecar_env).
        env = {**base_env(self.pass_env), **self.env, **sidecar_env(inv)}
        kwargs: dict[str, Any] = dict(
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=self.cwd,
            env=env,
            start_new_session=True,  # own process group: a timeout kills the command's children too
        )
        if isinstance(self.command, str):
            proc = await asyncio.create_subprocess_shell(self.command, **kwargs)
        else:
            proc = await asyncio.create_subprocess_exec(*self.command, **kwargs)
        started = time.time()
        reward_line: str | None = None
        failure_kind: str | None = None
        stdout_tail: deque[str] = deque(maxlen=50)
        stderr_tail: deque[str] = deque(maxlen=50)

        async def feed_stdin() -> None:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(json.dumps(emit.to_jsonable(inv.task)).encode() + b"\n")
                await proc.stdin.drain()
                proc.stdin.close()

        async def read_stdout() -> None:
            nonlocal reward_line, failure_kind
            assert proc.stdout is not None
            async for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n")
                if line.startswith(REWARD_PREFIX):
                    reward_line = line[len(REWARD_PREFIX) :]
                elif line.startswith(FAILURE_PREFIX):
                    failure_kind = line[len(FAILURE_PREFIX) :].strip()
                stdout_tail.append(line)
                if self.on_line is not None:
                    self.on_line(line)

        async def read_stderr() -> None:
            assert proc.stderr is not None
            async for raw in proc.stderr:
                stderr_tail.append(raw.decode(errors="replace").rstrip("\r\n"))

        try:
            await asyncio.gather(feed_stdin(), read_stdout(), read_stderr())
            code = await proc.wait()
        except BaseException:  # cancelled (timeout, loop, stop) or a reader failed
            await self._kill(proc)
            raise
        out_tail = "\n".join(stdout_tail)[-TAIL_CHARS:]
        err_tail = "\n".join(stderr_tail)[-TAIL_CHARS:]
        attrs = {
            SpanAttrs.sidecar_command: self.name,
            SpanAttrs.sidecar_exit_code: code,
            SpanAttrs.sidecar_stdout_tail: out_tail,
            SpanAttrs.sidecar_stderr_tail: err_tail,
        }
        emit.emit_span(SpanNames.sidecar, attrs, start_time=started, error=code != 0)
        if code != 0:
            kind = FailureKind.agent_exception
            if failure_kind:
                try:
                    kind = FailureKind(failure_kind)
                except ValueError:
                    logger.warning("sidecar printed unknown failure kind %r", failure_kind)
            raise SidecarError(f"command exited with code {code}; stderr tail:\n{err_tail}", kind)
        if reward_line is None:
            return None
        try:
            return parse_reward(reward_line)
        except (ValueError, TypeError, AttributeError) as exc:
            raise SidecarError(f"bad {REWARD_PREFIX} line {reward_line!r}: {exc}") from exc

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is not None:
            return
        for sig, wait in ((signal.SIGTERM, self.kill_grace_s), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), wait)
                return
            except TimeoutError:
                continue
            except asyncio.CancelledError:
                # cancelled again while waiting: make sure it is dead, then give up waiting
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                raise
