"""`kiln.Trainer`: server, engine, runners and algorithm together on one machine.

By default it starts everything in this process (server + engine in a thread, runners in
another, the algorithm on the main thread) and they talk over loopback HTTP exactly as
separate `kiln serve` / `kiln run` / `kiln train` processes would. Give `server_url` to
train against a server (and runners) started elsewhere instead.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from agentkiln.engine.base import Engine
from agentkiln.gateway.agent_names import AgentNames, AgentNamesSpec
from agentkiln.training.context import Algorithm, TrainingContext, TrainingResult

log = logging.getLogger(__name__)


class Trainer:
    def __init__(
        self,
        algorithm: Algorithm,
        *,
        n_runners: int = 8,
        runner_mode: str = "thread",
        store: str = "memory",
        engine: Union[str, Engine, None] = "smollm2",
        server_url: Optional[str] = None,
        api_key: Optional[str] = None,
        runner_key: Optional[str] = None,
        run_dir: Union[str, Path] = "runs/latest",
        port: int = 0,
        on_event: Optional[Callable[[str, dict[str, Any]], None]] = None,
        report_to: Union[str, Sequence[str], None] = "none",
        runners: str = "local",
        ray_address: Optional[str] = None,
        ray_options: Any = None,
        agent_names: AgentNamesSpec = None,
    ) -> None:
        """runners: "local" (workers in this process, `runner_mode` thread or process) or "ray"
        (n_runners Ray actors: a local Ray instance, or the cluster at `ray_address`; per-actor
        resource hints in `ray_options`, a RayActorOptions).

        agent_names: {regex: agent name} rules the embedded gateway names calls by, searched in
        each call's system prompt (first match wins), for agents that share one client; then
        `GRPO(agent_match=...)` / `GRPO(agents=[...])` select them. A server at `server_url` takes
        them as `kiln serve --agent-name REGEX=NAME` instead."""
        if runners not in ("local", "ray"):
            raise ValueError(f"runners must be 'local' or 'ray', got {runners!r}")
        self.algorithm = algorithm
        self.n_runners = n_runners
        self.runner_mode = runner_mode
        self.store_url = store
        self.engine = engine
        self.server_url = server_url
        self.api_key = api_key
        # Its runners hold only a runner key: with an embedded server and an admin key, a fresh one.
        self.runner_key = runner_key
        self.run_dir = Path(run_dir)
        self.port = port
        self.on_event = on_event or (lambda kind, data: None)
        self.report_to = report_to  # experiment trackers, as TRL's report_to: "tensorboard" or "none"
        self.runners = runners
        self.ray_address = ray_address
        self.ray_options = ray_options
        self.agent_names = AgentNames.of(agent_names)  # a bad rule fails here, not when the server starts
        if self.agent_names and server_url is not None:
            raise ValueError("agent_names configure the embedded server; give them to `kiln serve --agent-name`")
        self._server: Any = None
        self._engine_obj: Optional[Engine] = None

    # ------------------------------------------------------------------ embedded server
    def start_server(self) -> str:
        """Start store + engine + gateway in a background thread; returns its URL."""
        from agentkiln.engine.weight_roots import WeightsPolicy
        from agentkiln.server.app import create_app
        from agentkiln.server.serve import ServerThread, own_resources
        from agentkiln.store import open_store

        store = open_store(self.store_url)
        engine = self.engine
        if isinstance(engine, str):
            from agentkiln.engine.factory import build_engine

            engine = build_engine(engine)
        self._engine_obj = engine
        # Published weights load only from this run's folder (and $KILN_WEIGHTS_ROOTS).
        policy = WeightsPolicy.build([self.run_dir])
        if self.api_key and not self.runner_key:
            self.runner_key = secrets.token_urlsafe(32)
        app = create_app(
            store,
            api_key=self.api_key,
            runner_key=self.runner_key,
            engine=engine,
            weights_policy=policy,
            agent_names=self.agent_names,
        )
        app.state.run_dirs = [self.run_dir]  # the dashboard shows this run
        own_resources(app, store, engine)
        self._server = ServerThread(app, port=self.port)
        url = self._server.start(timeout=600)
        log.info("AgentKiln server on %s", url)
        return url

    def stop_server(self) -> None:
        if self._server is not None:
            self._server.stop(timeout=60)
            self._server = None

    # ------------------------------------------------------------------ fit
    def fit(self, agent: Any, train_data: Sequence[Any], val_data: Optional[Sequence[Any]] = None) -> TrainingResult:
        """Train `agent` (a @kiln.rollout function, kiln.Agent or "module:attr") on the tasks.

        agent=None: runners are started elsewhere (`kiln run ... --server URL`); only the
        algorithm runs here.
        """
        url = self.server_url or self.start_server()
        runner: Any = None
        runner_thread = None
        if agent is not None:
            runner = self._runner(agent, url)
            runner_thread = threading.Thread(target=runner.run, name="kiln-runners", daemon=True)
            runner_thread.start()
        try:
            return asyncio.run(self._run_algorithm(url, train_data, val_data))
        finally:
            if runner is not None and runner_thread is not None:
                runner.stop()
                runner_thread.join(timeout=120)
            if self.server_url is None:
                self.stop_server()

    def _runner(self, agent: Any, url: str) -> Any:
        key = self.runner_key or self.api_key
        if self.runners == "ray":
            from agentkiln.runner.ray_runner import RayRunner

            return RayRunner(
                agent, url, n_workers=self.n_runners, address=self.ray_address, options=self.ray_options, api_key=key
            )
        from agentkiln.runner.runner import Runner

        return Runner(agent, url, n_workers=self.n_runners, mode=self.runner_mode, api_key=key)  # type: ignore[arg-type]

    async def _run_algorithm(
        self, url: str, train_data: Sequence[Any], val_data: Optional[Sequence[Any]]
    ) -> TrainingResult:
        from agentkiln.store.client import HttpStore

        from agentkiln.training.trackers import build_trackers, with_trackers

        store = HttpStore(url, api_key=self.api_key)
        trackers = build_trackers(self.report_to, self.run_dir)
        try:
            ctx = TrainingContext(
                store=store,
                server_url=url,
                run_dir=self.run_dir,
                model_name=getattr(self._engine_obj, "model_name", None) or "smollm2-135m-instruct",
                api_key=self.api_key,
                on_event=with_trackers(self.on_event, trackers),
            )
            return await self.algorithm.run(ctx, train_data, val_data)
        finally:
            for tracker in trackers:
                tracker.close()
            await store.close()
