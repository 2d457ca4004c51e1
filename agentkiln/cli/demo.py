"""`kiln demo`: the main job — train the calculator agent with GRPO on CPU and show reward rising."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agentkiln.cli.app import app

log = logging.getLogger(__name__)


def _log_to_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)


@app.command()
def demo(
    steps: int = typer.Option(40, help="GRPO steps at most"),
    time_budget: float = typer.Option(540.0, help="stop training after this many seconds"),
    run_dir: Path = typer.Option(Path("runs/demo"), help="where history, plot and best adapter go"),
    n_runners: int = typer.Option(8, help="concurrent agent workers (the engine batches their calls)"),
    train_size: int = typer.Option(200),
    val_size: int = typer.Option(32),
    tasks_per_step: int = typer.Option(2),
    samples: int = typer.Option(8, help="rollouts per task (GRPO group size)"),
    eval_every: int = typer.Option(5),
    lr: float = typer.Option(2e-4),
    overlap: bool = typer.Option(True, help="sample the next step while learning this one (one step off-policy)"),
    engine: str = typer.Option("smollm2", help="engine spec: smollm2 (real model, embedded engine), vllm (SmolLM2 served by vLLM from .venv-vllm: "
        "bash scripts/setup_vllm.sh) or tiny (smoke test)"),
    fresh: bool = typer.Option(True, help="start over instead of resuming a checkpoint in run_dir"),
    verbose: bool = typer.Option(False, help="log to the terminal instead of run_dir/demo.log"),
    report_to: str = typer.Option("tensorboard", help="experiment tracker: tensorboard (run_dir/tensorboard) or none"),
    production: bool = typer.Option(
        False, "--production", help="deploy the agent on plain /v1 and learn only from simulated users' thumbs"
    ),
    rounds: int = typer.Option(8, help="--production: rounds of capture -> retrain -> canary"),
    sessions: int = typer.Option(64, help="--production: user sessions per round"),
    multi_agent: bool = typer.Option(
        False,
        "--multi-agent",
        help="train a planner and an answerer that split the task, one LoRA each, each on its own share of the reward",
    ),
) -> None:
    """Train a calculator-tool agent (plain openai SDK code) with GRPO+LoRA and report accuracy before/after."""
    import shutil

    from agentkiln.dashboard.plots import plot_reward_history
    from agentkiln.demo.agent import calculator_agent
    from agentkiln.demo.tasks import make_tasks
    from agentkiln.engine.model_files import tiny_model_dir
    from agentkiln.trainer import Trainer

    console = Console()
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    if not verbose:  # the progress bar and tables say what matters; logs go to run_dir/demo.log
        _log_to_file(run_dir / "demo.log")
    if production:
        from agentkiln.cli.demo_production import run_production_demo
        from agentkiln.demo.production import ProductionDemoConfig

        config = ProductionDemoConfig(
            rounds=rounds, sessions_per_round=sessions, users=n_runners, lr=lr, val_size=val_size, run_dir=run_dir
        )
        run_production_demo(config, engine, console)
        return
    train = make_tasks(train_size, seed=1, prefix="train")
    val = make_tasks(val_size, seed=2, prefix="val")
    if multi_agent:
        from agentkiln.cli.demo_multi_agent import MultiAgentDemo, run_multi_agent_demo

        options = MultiAgentDemo(
            steps=steps, time_budget_s=time_budget, lr=lr, tasks_per_step=tasks_per_step, samples=samples,
            eval_every=eval_every, n_runners=n_runners, engine=engine, run_dir=run_dir, report_to=report_to,
            overlap=overlap, resume=not fresh,
        )
        run_multi_agent_demo(options, train, val, console)
        return
    from agentkiln.demo.algorithm import build_demo_algorithm

    algorithm = build_demo_algorithm(
        steps=steps,
        time_budget_s=time_budget,
        lr=lr,
        tasks_per_step=tasks_per_step,
        samples=samples,
        eval_every=eval_every,
        model_dir=str(tiny_model_dir()) if engine == "tiny" else None,
        overlap=overlap,
    )
    algorithm.resume = not fresh
    console.print(
        f"[bold]AgentKiln demo[/]: calculator agent, {train_size} train / {val_size} val tasks, "
        f"GRPO {tasks_per_step}x{samples} rollouts per step, up to {steps} steps or {time_budget:.0f}s"
    )
    progress = Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
    )
    bar = progress.add_task("GRPO", total=steps, status="starting server and model...")

    def on_event(kind: str, data: dict[str, Any]) -> None:
        if kind == "step":
            status = f"train reward {data['train_reward']:.2f}"
            if "val_reward" in data:
                status += f" | val acc {data['val_reward']:.2f}"
            progress.update(bar, completed=data["step"], status=status)
        elif kind == "validation":
            progress.console.print(f"validation ({data['tag']}): accuracy {data['reward']:.3f} on {data['n']} tasks")
            progress.update(bar, status=f"val acc {data['reward']:.2f}")

    started = time.monotonic()
    trainer = Trainer(
        algorithm, n_runners=n_runners, engine=engine, run_dir=run_dir, on_event=on_event, report_to=report_to
    )
    with progress:
        result = trainer.fit(calculator_agent, train, val)
    elapsed = time.monotonic() - started

    plot = plot_reward_history(
        result.history,
        run_dir / "reward.png",
        val_before=result.val_before,
        title="AgentKiln demo: calculator agent, GRPO + LoRA on CPU",
    )
    summary = {**asdict(result), "total_s": elapsed, "plot": str(plot)}
    (run_dir / "result.json").write_text(json.dumps(summary, indent=2, default=str))

    table = Table(title="AgentKiln demo result")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("validation accuracy before", f"{result.val_before:.3f}" if result.val_before is not None else "-")
    table.add_row(
        "validation accuracy after (best)", f"{result.val_after:.3f}" if result.val_after is not None else "-"
    )
    table.add_row("GRPO steps", str(len(result.history)))
    table.add_row("training time", f"{result.elapsed_s:.0f} s")
    table.add_row("total time", f"{elapsed:.0f} s")
    table.add_row("best adapter", str(result.best_checkpoint or "(base model was best)"))
    table.add_row("reward plot", str(plot))
    console.print(table)
