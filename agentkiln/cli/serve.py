"""`kiln serve`: the store API (and, once wired, gateway, OTLP intake, dashboard) on one port."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional

import typer

from agentkiln.cli.app import app
from agentkiln.engine.weight_roots import DEFAULT_MAX_WEIGHT_SETS

log = logging.getLogger(__name__)


@app.command()
def serve(
    store: str = typer.Option(
        "./kiln.db",
        "--store",
        help="SQLite file path, or a store URL (sqlite://, memory://, postgresql://user@host/db?schema=name; "
        "give a PostgreSQL password by PGPASSWORD or ~/.pgpass, not in the URL, which shows in `ps`).",
    ),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Interface to listen on; keep loopback unless you set --api-key."
    ),
    port: int = typer.Option(4747, "--port", min=0, max=65535),
    api_key: Optional[str] = typer.Option(
        None,
        "--api-key",
        envvar="KILN_API_KEY",
        help="The admin key: require 'Authorization: Bearer <key>' (or X-Api-Key). Prefer the env var: "
        "a flag shows in `ps`.",
    ),
    runner_key: Optional[str] = typer.Option(
        None,
        "--runner-key",
        envvar="KILN_RUNNER_KEY",
        help="A narrower key for runners (dequeue, heartbeats, their attempts); agents get per-attempt tokens.",
    ),
    feedback_key: Optional[str] = typer.Option(
        None,
        "--feedback-key",
        envvar="KILN_FEEDBACK_KEY",
        help="A key for front ends that may only POST /api/v1/feedback (users' thumbs, scores, corrections).",
    ),
    engine: str = typer.Option(
        "smollm2",
        "--engine",
        help="Inference engine for the gateway: smollm2 (embedded), a model folder, vllm:<folder>[?options] "
        "(kiln starts and supervises vLLM from .venv-vllm), upstream:<url>#<model>[?model_dir=<folder>] "
        "(attach to a running server), or 'none' to serve only the store.",
    ),
    max_body_mb: float = typer.Option(16.0, "--max-body-mb", min=0.001, help="Largest accepted request body."),
    weights_root: list[Path] = typer.Option(
        [],
        "--weights-root",
        help="Folder published weights may be loaded from (repeatable; also $KILN_WEIGHTS_ROOTS, "
        "os.pathsep-separated). Default when neither is given: ./runs. Only local safetensors are loaded.",
    ),
    max_weight_sets: int = typer.Option(
        DEFAULT_MAX_WEIGHT_SETS, "--max-weight-sets", min=0, help="Most agents served weights of their own."
    ),
    max_tokens_default: Optional[int] = typer.Option(
        None,
        "--max-tokens-default",
        min=1,
        help="Token limit for gateway calls that send none (max_tokens / max_output_tokens). "
        "Default: none, they generate until a stop or the model's context limit.",
    ),
    capture: bool = typer.Option(
        False,
        "--capture/--no-capture",
        help="Record plain /v1 calls of deployed agents on production sessions (X-Kiln-Session header, "
        "metadata.session_id, or inferred); clients opt out per call with 'X-Kiln-Capture: off'.",
    ),
    capture_sample_rate: float = typer.Option(
        1.0, "--capture-sample-rate", min=0.0, max=1.0, help="Share of sessions recorded (chosen per session)."
    ),
    capture_retention_days: Optional[float] = typer.Option(
        None, "--capture-retention-days", min=0.0, help="Purge sessions idle this long (default: keep)."
    ),
    redact: list[str] = typer.Option(
        [],
        "--redact",
        help="Redact before storing: email, api_key, bearer, card, or re:<regex> (repeatable or comma-separated).",
    ),
    redact_hook: Optional[str] = typer.Option(
        None, "--redact-hook", help="module:function (str -> str) run on every stored production text."
    ),
    canary_interval_s: float = typer.Option(
        5.0, "--canary-interval-s", help="How often the active canary's rule is checked; 0: decided only by hand."
    ),
    agent_name: list[str] = typer.Option(
        [],
        "--agent-name",
        help="REGEX=NAME: a gateway call whose system prompt (or Responses instructions) matches REGEX "
        "(re.search) is recorded as agent NAME, for agents sharing one client. Repeatable; first match wins.",
    ),
) -> None:
    """Serve the store API over HTTP so runners and trainers on other processes or hosts share it."""
    from agentkiln.production.capture import CaptureConfig
    from agentkiln.server.host_check import UnsafeBindError
    from agentkiln.server.serve import serve as run_server

    try:
        capture_config = CaptureConfig(
            enabled=capture,
            sample_rate=capture_sample_rate,
            retention_days=capture_retention_days or None,
            redact=tuple(p for item in redact for p in item.split(",") if p.strip()),
            redact_hook=redact_hook,
        )
        from agentkiln.production.redaction import Redactor

        Redactor.build(capture_config.redact, capture_config.redact_hook)  # a bad pattern or hook fails here
    except (ValueError, ImportError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--redact / --redact-hook") from None
    from agentkiln.gateway.agent_names import AgentNames

    try:
        agent_names = AgentNames.from_cli(agent_name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--agent-name") from None

    shown = re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", store)  # a password in a database URL stays out of logs
    log.info("serving store %s on http://%s:%d (engine: %s)", shown, host, port, engine)
    try:
        run_server(
            store,
            host=host,
            port=port,
            api_key=api_key or None,
            runner_key=runner_key or None,
            feedback_key=feedback_key or None,
            engine_spec=engine,
            max_body_bytes=int(max_body_mb * 1_000_000),
            weights_roots=weights_root,
            max_weight_sets=max_weight_sets,
            max_tokens_default=max_tokens_default,
            capture=capture_config,
            canary_interval_s=canary_interval_s,
            agent_names=agent_names,
        )
    except UnsafeBindError as exc:
        raise typer.BadParameter(str(exc), param_hint="--host") from None
