"""Runner workers as Ray actors: `kiln run --ray -n N`, `kiln.Trainer(runners="ray")`.

Each actor runs one RolloutWorker against the server over HTTP, exactly as a `kiln run`
worker process does; Ray only places the actors (resource hints per actor) and tells the
driver when one is lost. Recovery stays the server's job, as with processes: a lost
actor's heartbeats stop, the sweep marks its attempt unresponsive and requeues it (per the
rollout's `retry_on`) for another worker, and the driver starts a replacement actor so
that N keep running. Ray is an extra (`pip install 'agentkiln[ray]'`), imported only here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

from agentkiln.runner.runner import (
    AgentSpec,
    BudgetCount,
    RolloutBudget,
    configure_worker_logging,
    install_stop_signals,
    load_agent,
    run_worker,
    with_tracing,
)
from agentkiln.runner.sidecar import CommandAgent
from agentkiln.runner.worker import WorkerConfig, default_worker_id

log = logging.getLogger(__name__)


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:  # a runner-only install without the extra
        raise RuntimeError("Ray runners need Ray: pip install 'agentkiln[ray]'") from exc
    return ray


@dataclass
class RayActorOptions:
    """What each runner actor asks the Ray scheduler for, and how lost actors are replaced.

    num_cpus defaults to 1 (Ray's own default for an actor's placement): an agent that runs
    tools or a sidecar program uses a core. `resources` are custom Ray resources (e.g.
    {"browser_host": 1} to place actors on nodes that have one). `runtime_env` is passed to
    Ray as is (working_dir, pip, env_vars); on the local machine the driver's working
    directory is put on PYTHONPATH so "module:function" agents import as under `kiln run`.
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: Optional[int] = None  # bytes
    resources: dict[str, float] = field(default_factory=dict)
    runtime_env: Optional[dict[str, Any]] = None
    max_replacements: Optional[int] = None  # lost actors replaced in all; None = 2 x N

    def actor_options(self, env_vars: dict[str, str]) -> dict[str, Any]:
        env = dict(self.runtime_env or {})
        env["env_vars"] = {**env_vars, **env.get("env_vars", {})}
        options: dict[str, Any] = {
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "resources": dict(self.resources),
            "runtime_env": env,
            "max_concurrency": 2,  # run() and stop() on two threads of the actor
            "max_restarts": 0,  # a lost actor's attempt is the server's to requeue; the driver replaces the actor
        }
        if self.memory is not None:
            options["memory"] = self.memory
        return options


class RunnerActor:
    """One worker in a Ray actor process (wrapped with ray.remote when a RayRunner starts)."""

    def __init__(self, agent_spec: AgentSpec, store_url: str, config: WorkerConfig, worker_id: str, otel: bool):
        configure_worker_logging()
        self.agent_spec = agent_spec
        self.store_url = store_url
        self.config = with_tracing(config) if otel else config
        self.worker_id = worker_id
        self._stop = threading.Event()

    def run(self, until_empty: bool, budget: Any = None) -> int:
        """Work until stop(), the budget actor says no more, or (until_empty) the queue is empty."""
        agent = load_agent(self.agent_spec)
        claim = unclaim = None
        if budget is not None:
            ray = import_ray()
            claim = lambda: ray.get(budget.claim.remote())  # noqa: E731 - called between attempts, on this thread
            unclaim = lambda: ray.get(budget.unclaim.remote())  # noqa: E731

        return asyncio.run(
            run_worker(
                agent, self.store_url, self.config, self.worker_id,
                should_stop=self._stop.is_set, claim=claim, unclaim=unclaim, until_empty=until_empty,
            )
        )

    def stop(self) -> None:
        self._stop.set()


class BudgetActor:
    """The rollout budget (max_rollouts) shared by all actors of one RayRunner."""

    def __init__(self, total: int):
        self.budget = RolloutBudget(BudgetCount(total), threading.Lock())

    def claim(self) -> bool:
        return self.budget.claim()

    def unclaim(self) -> None:
        self.budget.unclaim()


class RayRunner:
    """Runs `agent` on the server's rollouts with n_workers Ray actors; `run()` blocks like Runner.run().

    agent: "module:function" / "module:Class", a @kiln.rollout function, a kiln.Agent or a
    CommandAgent (sidecar: its `pass_env` variables are read here and given to the actors).
    address: a Ray cluster ("auto", "ray://host:10001", "host:6379"); None = RAY_ADDRESS or a
    cluster `ray start` left on this machine, else a fresh local one. When this runner
    started Ray it shuts it down at the end; a session the caller opened is left open.
    """

    def __init__(
        self,
        agent: AgentSpec,
        server_url: str,
        *,
        n_workers: int = 4,
        address: Optional[str] = None,
        api_key: Optional[str] = None,
        config: Optional[WorkerConfig] = None,
        options: Optional[RayActorOptions] = None,
        max_rollouts: Optional[int] = None,
        until_empty: bool = False,
        otel: bool = False,
        worker_prefix: str = "ray",
        init_kwargs: Optional[dict[str, Any]] = None,
    ):
        if n_workers < 1:
            raise ValueError("n_workers must be >= 1")
        import_ray()  # fail here, not when run() starts, if the extra is not installed
        if not server_url.startswith(("http://", "https://")):
            raise ValueError("Ray runners reach the server over HTTP: give its http(s) URL")
        self.agent = agent
        self.server_url = server_url
        self.n_workers = n_workers
        self.address = address
        self.options = options or RayActorOptions()
        self.max_rollouts = max_rollouts
        self.until_empty = until_empty
        self.otel = otel
        self.worker_prefix = worker_prefix
        self.init_kwargs = dict(init_kwargs or {})
        base = config or WorkerConfig()
        self.config = replace(base, api_key=api_key or base.api_key, gateway_url=base.gateway_url or server_url)
        self._stop = threading.Event()
        self._actors: dict[int, tuple[str, Any]] = {}  # slot -> (worker id, live actor handle)
        self.lost = 0  # actors lost while running

    # ------------------------------------------------------------------ control
    def stop(self) -> None:
        """Ask every actor to stop after its current attempt (thread-safe)."""
        self._stop.set()

    def actors(self) -> list[Any]:
        """The live actor handles (for tests and operators: e.g. ray.kill one)."""
        return [actor for _, actor in self._actors.values()]

    def actor_of(self, worker_id: str) -> Any:
        """The live actor that runs as `worker_id` (the id its attempts carry)."""
        for wid, actor in self._actors.values():
            if wid == worker_id:
                return actor
        raise KeyError(f"no live actor runs as {worker_id!r}")

    def _env_vars(self) -> dict[str, str]:
        env: dict[str, str] = {}
        if isinstance(self.agent, CommandAgent):
            env.update({name: os.environ[name] for name in self.agent.pass_env if name in os.environ})
        if self.options.runtime_env is None or "working_dir" not in self.options.runtime_env:
            paths: Sequence[str] = [os.getcwd(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
            env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        return env

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        """Block until every actor is done (budget spent, queue empty with until_empty, or stop()); attempts run."""
        ray = import_ray()
        started_ray = not ray.is_initialized()
        if started_ray:
            kwargs = {"include_dashboard": False, "logging_level": logging.WARNING, **self.init_kwargs}
            ray.init(address=self.address, **kwargs)
        actor_cls = ray.remote(RunnerActor).options(**self.options.actor_options(self._env_vars()))
        budget = None
        if self.max_rollouts is not None:
            budget = ray.remote(BudgetActor).options(num_cpus=0).remote(self.max_rollouts)
        pending: dict[Any, int] = {}  # run() ref -> slot

        def start(slot: int) -> None:
            worker_id = f"{self.worker_prefix}-{default_worker_id(slot)}"
            actor = actor_cls.remote(self.agent, self.server_url, self.config, worker_id, self.otel)
            self._actors[slot] = (worker_id, actor)
            pending[actor.run.remote(self.until_empty, budget)] = slot

        def terminate(force: bool) -> None:
            for actor in self.actors():
                ray.kill(actor, no_restart=True)

        restore = install_stop_signals(self.stop, terminate)
        total, replacements, stopping = 0, 0, False
        max_replacements = 2 * self.n_workers if self.options.max_replacements is None else self.options.max_replacements
        try:
            for slot in range(self.n_workers):
                start(slot)
            while pending:
                if self._stop.is_set() and not stopping:
                    stopping = True
                    for actor in self.actors():
                        actor.stop.remote()
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for ref in ready:
                    slot = pending.pop(ref)
                    self._actors.pop(slot, None)
                    try:
                        total += int(ray.get(ref))
                    except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
                        self.lost += 1
                        log.warning(
                            "runner actor %d lost (%s); the server requeues its attempt when its heartbeats stop",
                            slot,
                            type(exc).__name__,
                        )
                        if not self._stop.is_set() and replacements < max_replacements:
                            replacements += 1
                            start(slot)
        finally:
            restore()
            terminate(True)
            if started_ray:
                ray.shutdown()
        return total
