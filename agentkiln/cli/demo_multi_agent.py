"""`kiln demo --multi-agent`: a planner and an answerer, one LoRA each, each trained on its own share."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

SHARE_LABELS = {
    "planner": "planner: expression right",
    "answerer": "answerer: reports its number",
}


@dataclass
class MultiAgentDemo:
    steps: int
    time_budget_s: float | None
    lr: float
    tasks_per_step: int
    samples: int
    eval_every: int
    n_runners: int
    engine: str
    run_dir: Path
    report_to: str = "none"
    overlap: bool = True
    resume: bool = False


def best_tag(result: Any) -> str | None:
    """The validation tag of the adapters kept as best ("before": the base model stayed best)."""
    if result.val_before is None:
        return None
    if result.best_checkpoint is None:
        return "before"
    for record in result.history:  # the best is replaced only on a strict improvement: the first to reach it
        if record.get("val_reward") == result.best_val:
            return f"step-{record['step']}"
    return None


def shares(result: Any, agents: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """Each agent's validation share and the accuracy, before training and with the best adapters."""
    by_tag = result.extra.get("val_rewards", {})
    after = best_tag(result)
    out: dict[str, dict[str, float | None]] = {
        agent: {
            "before": by_tag.get("before", {}).get(agent),
            "after": by_tag.get(after, {}).get(agent) if after else None,
        }
        for agent in agents
    }
    out["accuracy"] = {"before": result.val_before, "after": result.val_after}
    return out


def run_multi_agent_demo(options: MultiAgentDemo, train: list[Any], val: list[Any], console: Console) -> dict[str, Any]:
    from agentkiln.demo.algorithm import build_demo_algorithm
    from agentkiln.dashboard.plots import plot_reward_history
    from agentkiln.demo.multi_agent import AGENTS, planner_answerer_agent
    from agentkiln.engine.model_files import tiny_model_dir
    from agentkiln.trainer import Trainer

    run_dir = options.run_dir
    algorithm = build_demo_algorithm(
        steps=options.steps,
        time_budget_s=options.time_budget_s,
        lr=options.lr,
        tasks_per_step=options.tasks_per_step,
        samples=options.samples,
        eval_every=options.eval_every,
        model_dir=str(tiny_model_dir()) if options.engine == "tiny" else None,
        overlap=options.overlap,
        agents=list(AGENTS),
        agent_rewards=list(AGENTS),  # each LoRA learns from its own agent's share
    )
    algorithm.resume = options.resume
    console.print(
        f"[bold]AgentKiln multi-agent demo[/]: planner writes the expression, answerer reports the result; "
        f"one LoRA each, each on its own reward; {len(train)} train / {len(val)} val tasks, "
        f"GRPO {options.tasks_per_step}x{options.samples} rollouts per step, up to {options.steps} steps "
        f"or {options.time_budget_s:.0f}s"
    )
    progress = Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
    )
    bar = progress.add_task("GRPO", total=options.steps, status="starting server and model...")

    def _fmt(rewards: dict[str, float]) -> str:
        return " ".join(f"{agent} {rewards[agent]:.2f}" for agent in AGENTS if agent in rewards)

    def on_event(kind: str, data: dict[str, Any]) -> None:
        if kind == "step":
            status = f"train reward {data['train_reward']:.2f} ({_fmt(data.get('train_rewards', {}))})"
            if "val_reward" in data:
                status += f" | val acc {data['val_reward']:.2f}"
            progress.update(bar, completed=data["step"], status=status)
        elif kind == "validation":
            progress.console.print(
                f"validation ({data['tag']}): accuracy {data['reward']:.3f} on {data['n']} tasks; "
                f"shares {_fmt(data.get('rewards', {}))}"
            )

    started = time.monotonic()
    trainer = Trainer(
        algorithm,
        n_runners=options.n_runners,
        engine=options.engine,
        run_dir=run_dir,
        on_event=on_event,
        report_to=options.report_to,
    )
    with progress:
        result = trainer.fit(planner_answerer_agent, train, val)
    elapsed = time.monotonic() - started

    plot = plot_reward_history(
        result.history,
        run_dir / "reward.png",
        val_before=result.val_before,
        title="AgentKiln multi-agent demo: planner + answerer, one LoRA each",
    )
    per_agent = shares(result, AGENTS)
    summary = {**asdict(result), "shares": per_agent, "total_s": elapsed, "plot": str(plot)}
    (run_dir / "result.json").write_text(json.dumps(summary, indent=2, default=str))

    table = Table(title="AgentKiln multi-agent demo result (validation)")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after (best)", justify="right")
    labels = {**SHARE_LABELS, "accuracy": "final answer right (accuracy)"}
    for key, values in per_agent.items():
        table.add_row(labels.get(key, key), *(f"{v:.3f}" if v is not None else "-" for v in values.values()))
    console.print(table)
    console.print(
        f"{len(result.history)} GRPO steps, training {result.elapsed_s:.0f} s, total {elapsed:.0f} s; "
        f"best adapters: {result.best_checkpoint or '(base model was best)'}; plot: {plot}"
    )
    return summary
