"""`kiln.Runner`: run N workers of one agent against a store, as processes or in-process tasks.

Process mode (default) isolates agents from each other and from the runner: a crashed
or hung agent process is detected by the server (heartbeats stop) and its rollout retried,
and CPU-bound agents run in parallel. Each process opens its own HttpStore. Thread mode
runs the workers as asyncio tasks in the calling process (sync agents in threads): cheap,
debuggable, and what tests use with an in-memory store.

Stopping is graceful: workers finish their current attempt, then exit. In `run()`, the
first Ctrl-C / SIGTERM asks for that; a second one terminates worker processes.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import signal
import threading
from dataclasses import replace
from typing import Any, Callable, Literal, Union

from agentkiln.runner.agent import BaseAgent, as_agent, import_agent
from agentkiln.runner.worker import RolloutWorker, WorkerConfig, default_worker_id
from agentkiln.store.base import Store

logger = logging.getLogger(__name__)

AgentSpec = Union[str, BaseAgent, Any]
WORKERS_PER_CLIENT = 25  # thread-mode workers sharing one HttpStore


def open_runner_store(url: str, api_key: str | None = None) -> Store:
    """HttpStore for http(s) URLs; anything else goes through agentkiln.store.open_store."""
    if url.startswith(("http://", "https://")):
        from agentkiln.store.client import HttpStore

        return HttpStore(url, api_key=api_key)
    from agentkiln.store import open_store  # type: ignore[attr-defined]

    return open_store(url)


def load_agent(spec: AgentSpec) -> BaseAgent:
    return import_agent(spec) if isinstance(spec, str) else as_agent(spec)


class RolloutBudget:
    """Shared count of rollouts still to take (None = unlimited); process-safe when given mp primitives."""

    def __init__(self, value: Any, lock: Any):
        self.value = value  # object with .value (int, -1 = unlimited)
        self.lock = lock

    def claim(self) -> bool:
        with self.lock:
            if self.value.value < 0:
                return True
            if self.value.value == 0:
                return False
            self.value.value -= 1
            return True

    def unclaim(self) -> None:
        with self.lock:
            if self.value.value >= 0:
                self.value.value += 1


class BudgetCount:
    def __init__(self, value: int):
        self.value = value


class Runner:
    """Runs `agent` on rollouts from `store` with n_workers workers.

    agent: "module:function" / "module:Class" reference, a @kiln.rollout function, a kiln.Agent
    (class or instance) or a sidecar CommandAgent. In process mode it must be importable by
    reference (module level) and store must be a URL.
    store: server URL (http://...) or a Store instance (thread mode only).
    max_rollouts: stop after taking this many attempts in total; until_empty: stop when the
    queue is empty. gateway_url defaults to the server URL, so LLM calls go through its gateway.
    """

    def __init__(
        self,
        agent: AgentSpec,
        store: str | Store,
        *,
        n_workers: int = 4,
        mode: Literal["process", "thread"] = "process",
        max_rollouts: int | None = None,
        until_empty: bool = False,
        api_key: str | None = None,
        gateway_url: str | None = None,
        config: WorkerConfig | None = None,
        otel: bool = False,
        worker_prefix: str | None = None,
    ):
        if n_workers < 1:
            raise ValueError("n_workers must be >= 1")
        if mode not in ("process", "thread"):
            raise ValueError(f"mode must be 'process' or 'thread', got {mode!r}")
        if mode == "process" and not isinstance(store, str):
            raise ValueError("process mode needs a store URL (each process opens its own connection)")
        self.agent = agent
        self.store = store
        self.n_workers = n_workers
        self.mode = mode
        self.max_rollouts = max_rollouts
        self.until_empty = until_empty
        self.otel = otel
        self.worker_prefix = worker_prefix
        server_url = store if isinstance(store, str) and store.startswith(("http://", "https://")) else None
        base = config or WorkerConfig()
        self.config = replace(
            base,
            api_key=api_key if api_key is not None else base.api_key,
            gateway_url=gateway_url or base.gateway_url or server_url,
        )
        self._stop_thread = threading.Event()
        self._stop_mp: Any = None
        self._procs: list[Any] = []

    # ------------------------------------------------------------------ control
    def stop(self) -> None:
        """Ask workers to stop after their current attempt (thread-safe)."""
        self._stop_thread.set()
        if self._stop_mp is not None:
            self._stop_mp.set()

    def _worker_id(self, i: int) -> str:
        return f"{self.worker_prefix}-{i}" if self.worker_prefix else default_worker_id(i)

    # ------------------------------------------------------------------ thread mode
    async def arun(self) -> int:
        """Run in-process workers on the current event loop; returns attempts run."""
        if self.mode != "thread":
            raise RuntimeError("arun() is for mode='thread'; use run() for processes")
        agent = load_agent(self.agent)
        # A URL: one client per WORKERS_PER_CLIENT workers (one httpx pool shared by a thousand
        # coroutines costs more CPU than the server does: bench/RESULTS.md, 1,000 runners).
        owned: list[Store] = []
        if isinstance(self.store, str):
            clients = -(-self.n_workers // WORKERS_PER_CLIENT)
            owned = [open_runner_store(self.store, self.config.api_key) for _ in range(clients)]
        lock = threading.Lock()
        budget = RolloutBudget(BudgetCount(-1 if self.max_rollouts is None else self.max_rollouts), lock)
        await agent.prepare()  # once, before workers race to do it
        config = with_tracing(self.config) if self.otel else self.config
        workers = [
            RolloutWorker(
                agent,
                owned[i // WORKERS_PER_CLIENT] if owned else self.store,  # type: ignore[arg-type]
                worker_id=self._worker_id(i),
                config=config,
            )
            for i in range(self.n_workers)
        ]
        try:
            counts = await asyncio.gather(
                *(
                    w.run(
                        should_stop=self._stop_thread.is_set,
                        claim=budget.claim,
                        unclaim=budget.unclaim,
                        until_empty=self.until_empty,
                    )
                    for w in workers
                )
            )
        finally:
            for store in owned:
                await store.close()
        return sum(counts)

    # ------------------------------------------------------------------ both
    def run(self) -> int:
        """Block until done (budget spent, queue empty with until_empty, or stop()); returns attempts run."""
        if self.mode == "thread":
            return asyncio.run(self.arun())
        return self._run_processes()

    def _run_processes(self) -> int:
        ctx = mp.get_context("spawn")
        self._stop_mp = ctx.Event()
        if self._stop_thread.is_set():
            self._stop_mp.set()
        budget_value = ctx.Value("i", -1 if self.max_rollouts is None else self.max_rollouts)
        counts = ctx.Array("i", self.n_workers)
        self._procs = [
            ctx.Process(
                target=_process_main,
                args=(
                    self.agent,
                    self.store,
                    self.config,
                    self._worker_id(i),
                    self._stop_mp,
                    budget_value,
                    self.until_empty,
                    self.otel,
                    counts,
                    i,
                ),
                name=f"kiln-worker-{i}",
                daemon=False,
            )
            for i in range(self.n_workers)
        ]
        restore = self._install_signal_handlers()
        try:
            for p in self._procs:
                p.start()
            for p in self._procs:
                p.join()
        finally:
            restore()
        failed = [p for p in self._procs if p.exitcode not in (0, None)]
        for p in failed:
            logger.warning("worker process %s exited with code %s", p.name, p.exitcode)
        return int(sum(counts[:]))

    def _install_signal_handlers(self) -> Any:
        def terminate(force: bool) -> None:
            for p in self._procs:
                if p.is_alive():
                    p.kill() if force else p.terminate()

        return install_stop_signals(self.stop, terminate)


def install_stop_signals(stop: Callable[[], None], terminate: Callable[[bool], None]) -> Callable[[], None]:
    """First Ctrl-C / SIGTERM: stop() (workers finish their attempt); second: terminate(False); then terminate(True).

    Returns the function that puts the previous handlers back; a no-op off the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    presses = {"n": 0}

    def handle(signum: int, frame: Any) -> None:
        presses["n"] += 1
        if presses["n"] == 1:
            logger.info("stopping: workers finish their current rollout (again to terminate)")
            stop()
        else:
            if presses["n"] == 2:
                logger.warning("terminating workers (abandoning their current rollouts)")
            terminate(presses["n"] > 2)

    old = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)

    return restore


def with_tracing(config: WorkerConfig) -> WorkerConfig:
    """Install the OTLP exporter to the server and flush it after each attempt."""
    if not config.gateway_url:
        logger.warning("otel=True needs a server URL to export to; tracing not set up")
        return config
    from agentkiln.runner.tracing import setup_tracing

    provider = setup_tracing(config.gateway_url, api_key=config.api_key)
    return replace(config, after_attempt=lambda: provider.force_flush(5_000))


def configure_worker_logging() -> None:
    """Log lines of a worker process (a spawned process or a Ray actor): level from KILN_LOG_LEVEL."""
    logging.basicConfig(
        level=os.environ.get("KILN_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per poll/heartbeat drowns the agent's logs


async def run_worker(
    agent: BaseAgent,
    store_url: str,
    config: WorkerConfig,
    worker_id: str,
    *,
    should_stop: Callable[[], bool],
    claim: Callable[[], bool] | None = None,
    unclaim: Callable[[], None] | None = None,
    until_empty: bool = False,
) -> int:
    """One RolloutWorker over its own store client, in a worker process or a Ray actor; returns rollouts run."""
    store = open_runner_store(store_url, config.api_key)
    try:
        worker = RolloutWorker(agent, store, worker_id=worker_id, config=config)
        return await worker.run(should_stop=should_stop, claim=claim, unclaim=unclaim, until_empty=until_empty)
    finally:
        await store.close()


def _process_main(
    agent_spec: AgentSpec,
    store_url: str,
    config: WorkerConfig,
    worker_id: str,
    stop_event: Any,
    budget_value: Any,
    until_empty: bool,
    otel: bool,
    counts: Any,
    index: int,
) -> None:
    """Entry of one worker process."""
    # The parent coordinates Ctrl-C (it reaches the whole process group); SIGTERM stops gracefully.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_term(signum: int, frame: Any) -> None:
        if not stop_event.is_set():
            stop_event.set()  # graceful: finish the current attempt
            return
        # Already stopping: abort now. asyncio.run cancels the attempt (sidecars get their group killed).
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    configure_worker_logging()
    agent = load_agent(agent_spec)
    if otel:
        config = with_tracing(config)
    budget = RolloutBudget(budget_value, budget_value.get_lock())

    try:
        counts[index] = asyncio.run(
            run_worker(
                agent, store_url, config, worker_id,
                should_stop=stop_event.is_set, claim=budget.claim, unclaim=budget.unclaim, until_empty=until_empty,
            )
        )
    except KeyboardInterrupt:
        logger.warning("worker %s aborted; its current attempt is left to the server's unresponsive sweep", worker_id)
        raise SystemExit(130) from None
