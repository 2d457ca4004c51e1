"""`kiln run`: start runner workers for an agent (Python reference or any command) against a server."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import typer

from agentkiln.cli.app import app

log = logging.getLogger(__name__)

DEFAULT_SERVER = "http://127.0.0.1:4747"


def importable_cwd() -> None:
    """Agent references name modules of the user's project: make the working directory importable (children inherit it)."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


@app.command("run")
def run(
    agent_ref: str | None = typer.Argument(None, help="module:function or module:Class of the agent."),
    command: str | None = typer.Option(
        None, "--command", "-c", help="Run this shell command per rollout instead (sidecar, any language)."
    ),
    server: str = typer.Option(DEFAULT_SERVER, "--server", envvar="KILN_SERVER_URL", help="kiln server URL."),
    workers: int = typer.Option(4, "-n", "--workers", min=1, help="Parallel workers."),
    max_rollouts: int | None = typer.Option(None, "--max-rollouts", min=0, help="Stop after this many attempts."),
    until_empty: bool = typer.Option(False, "--until-empty", help="Stop when the queue is empty."),
    mode: str = typer.Option("process", "--mode", help="'process' (isolated, default) or 'thread' (in-process)."),
    api_key: str | None = typer.Option(
        None,
        "--api-key",
        envvar=["KILN_RUNNER_KEY", "KILN_API_KEY"],
        help="The server's runner key (prefer the env var: a flag shows in `ps`).",
    ),
    pass_env: list[str] = typer.Option(
        [], "--pass-env", help="With --command: a variable of this environment the command also gets (repeatable)."
    ),
    otel: bool = typer.Option(False, "--otel", help="Export OpenTelemetry spans of the agent to the server."),
    heartbeat_s: float = typer.Option(5.0, "--heartbeat-s", min=0.05, help="Attempt heartbeat interval."),
    ray: bool = typer.Option(False, "--ray", help="Run the workers as Ray actors (pip install 'agentkiln[ray]')."),
    ray_address: str | None = typer.Option(
        None, "--ray-address", envvar="RAY_ADDRESS", help="Ray cluster to join (default: a local one)."
    ),
    ray_num_cpus: float = typer.Option(1.0, "--ray-num-cpus", min=0.0, help="CPUs each Ray actor asks for."),
    ray_num_gpus: float = typer.Option(0.0, "--ray-num-gpus", min=0.0, help="GPUs each Ray actor asks for."),
    ray_memory_mb: int | None = typer.Option(None, "--ray-memory-mb", min=1, help="Memory each Ray actor asks for."),
    ray_resource: list[str] = typer.Option(
        [], "--ray-resource", help="NAME=AMOUNT: a custom Ray resource each actor asks for (repeatable)."
    ),
    ray_working_dir: str | None = typer.Option(
        None, "--ray-working-dir", help="Folder Ray ships to the actors' nodes (runtime_env working_dir)."
    ),
) -> None:
    """Take rollouts from the server's queue and run the agent on them until stopped (Ctrl-C: finish, twice: kill)."""
    from agentkiln.runner.runner import Runner
    from agentkiln.runner.sidecar import CommandAgent
    from agentkiln.runner.worker import WorkerConfig

    if (agent_ref is None) == (command is None):
        raise typer.BadParameter("give either AGENT_REF (module:function) or --command, not both")
    if mode not in ("process", "thread"):
        raise typer.BadParameter("--mode must be 'process' or 'thread'")
    importable_cwd()
    agent = CommandAgent(command, pass_env=pass_env) if command is not None else agent_ref
    if agent_ref is not None:
        from agentkiln.runner.agent import import_agent

        import_agent(agent_ref)  # fail fast here, not in every worker process
    if ray:
        runner: Any = _ray_runner(
            agent,
            server,
            workers=workers,
            address=ray_address,
            options=_ray_options(ray_num_cpus, ray_num_gpus, ray_memory_mb, ray_resource, ray_working_dir),
            max_rollouts=max_rollouts,
            until_empty=until_empty,
            api_key=api_key,
            otel=otel,
            heartbeat_s=heartbeat_s,
        )
        log.info("running %s with %d Ray actor(s) against %s", agent_ref or command, workers, server)
        typer.echo(f"{runner.run()} attempt(s) run")
        return
    runner = Runner(
        agent,
        server,
        n_workers=workers,
        mode=mode,  # type: ignore[arg-type]
        max_rollouts=max_rollouts,
        until_empty=until_empty,
        api_key=api_key,
        otel=otel,
        config=WorkerConfig(heartbeat_s=heartbeat_s),
    )
    log.info("running %s with %d %s worker(s) against %s", agent_ref or command, workers, mode, server)
    done = runner.run()
    typer.echo(f"{done} attempt(s) run")


def _ray_options(
    num_cpus: float, num_gpus: float, memory_mb: int | None, resources: list[str], working_dir: str | None
) -> Any:
    from agentkiln.runner.ray_runner import RayActorOptions

    custom: dict[str, float] = {}
    for item in resources:
        name, sep, amount = item.partition("=")
        try:
            custom[name.strip()] = float(amount) if sep else 1.0
        except ValueError:
            raise typer.BadParameter(f"--ray-resource {item!r}: give NAME=AMOUNT, e.g. browser_host=1") from None
        if not name.strip() or custom[name.strip()] <= 0:
            raise typer.BadParameter(f"--ray-resource {item!r}: give NAME=AMOUNT with AMOUNT > 0")
    return RayActorOptions(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        memory=memory_mb * 2**20 if memory_mb else None,
        resources=custom,
        runtime_env={"working_dir": working_dir} if working_dir else None,
    )


def _ray_runner(agent: Any, server: str, *, workers: int, heartbeat_s: float, **kwargs: Any) -> Any:
    from agentkiln.runner.ray_runner import RayRunner
    from agentkiln.runner.worker import WorkerConfig

    try:
        return RayRunner(agent, server, n_workers=workers, config=WorkerConfig(heartbeat_s=heartbeat_s), **kwargs)
    except (RuntimeError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
