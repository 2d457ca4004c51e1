"""`kiln train` and `kiln export`: the algorithm side as its own process, against a running server."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, Optional

import typer

from agentkiln.cli.app import app
from agentkiln.cli.run import DEFAULT_SERVER

log = logging.getLogger(__name__)


def read_tasks(path: Path) -> list[Any]:
    """Tasks from JSONL (one JSON value a line) or a JSON list."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc}") from exc
    try:
        if text.lstrip().startswith("["):
            tasks = json.loads(text)
        else:
            tasks = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"{path}: not JSON/JSONL ({exc})") from exc
    if not tasks:
        raise typer.BadParameter(f"{path} holds no tasks")
    return tasks


@app.command("train")
def train(
    train_file: Path = typer.Argument(..., help="training tasks (JSONL or a JSON list)"),
    val_file: Optional[Path] = typer.Option(None, "--val", help="validation tasks"),
    server: str = typer.Option(DEFAULT_SERVER, "--server", envvar="KILN_SERVER_URL"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="KILN_API_KEY"),
    model_dir: Optional[str] = typer.Option(None, help="weights the server's engine serves (default: SmolLM2)"),
    steps: int = typer.Option(20),
    tasks_per_step: int = typer.Option(2),
    samples: int = typer.Option(8, help="rollouts per task (GRPO group size)"),
    lr: float = typer.Option(1e-4),
    temperature: float = typer.Option(1.0),
    agent_match: Optional[str] = typer.Option(None, help="regex: train only these agents' LLM calls"),
    eval_every: int = typer.Option(5),
    run_dir: Path = typer.Option(Path("runs/train")),
    resume: bool = typer.Option(True, help="continue from run_dir/checkpoint if present"),
) -> None:
    """Train with GRPO against a `kiln serve` server; runners are started separately with `kiln run`."""
    from agentkiln.algorithms.grpo import GRPOConfig
    from agentkiln.algorithms.grpo_algorithm import GRPO
    from agentkiln.trainer import Trainer

    algorithm = GRPO(
        model_dir=model_dir,
        steps=steps,
        tasks_per_step=tasks_per_step,
        samples_per_task=samples,
        temperature=temperature,
        agent_match=agent_match,
        eval_every=eval_every,
        resume=resume,
        config=GRPOConfig(lr=lr),
    )
    trainer = Trainer(algorithm, server_url=server, api_key=api_key, run_dir=run_dir)
    result = trainer.fit(None, read_tasks(train_file), read_tasks(val_file) if val_file else None)
    typer.echo(json.dumps({"val_before": result.val_before, "val_after": result.val_after,
                           "best_checkpoint": result.best_checkpoint, "steps": len(result.history)}))


@app.command("export")
def export(
    out: Path = typer.Argument(..., help="JSONL file to write transitions to"),
    server: str = typer.Option(DEFAULT_SERVER, "--server", envvar="KILN_SERVER_URL"),
    store: Optional[str] = typer.Option(None, "--store", help="read a store directly (e.g. runs/kiln.db)"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="KILN_API_KEY"),
    mode: Optional[str] = typer.Option(None, help="only rollouts of this mode (train/val/test)"),
    agent_match: Optional[str] = typer.Option(None, help="regex on agent names"),
    merge: bool = typer.Option(False, help="merge turns whose token history continues"),
) -> None:
    """Export finished rollouts as RL transitions (JSONL) for other trainers."""
    from agentkiln.adapter.export import write_jsonl

    transitions, skipped = asyncio.run(_collect(store or server, api_key, mode, agent_match, merge))
    n = write_jsonl(transitions, out)
    typer.echo(f"wrote {n} transitions to {out} ({len(skipped)} LLM calls left out)")


async def _collect(url: str, api_key: Optional[str], mode: Optional[str], agent_match: Optional[str], merge: bool):
    from agentkiln.adapter.transitions import build_batch
    from agentkiln.models import RolloutMode, RolloutStatus
    from agentkiln.store import open_store
    from agentkiln.store.client import HttpStore

    store = HttpStore(url, api_key=api_key) if url.startswith(("http://", "https://")) else open_store(url)
    try:
        items = []
        offset = 0
        while True:
            page = await store.query_rollouts(
                status=[RolloutStatus.succeeded, RolloutStatus.failed],
                mode=RolloutMode(mode) if mode else None,
                limit=500,
                offset=offset,
            )
            for rollout in page:
                attempts = await store.query_attempts(rollout.rollout_id)
                spans = await store.query_spans(rollout.rollout_id)
                items.append((rollout, attempts, spans))
            if len(page) < 500:
                break
            offset += 500
        return build_batch(items, agent_match=agent_match, merge=merge)
    finally:
        await store.close()
