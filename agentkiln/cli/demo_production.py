"""`kiln demo --production`: serve the calculator agent as deployed, learn from simulated users' thumbs."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

log = logging.getLogger(__name__)


def start_production_server(run_dir: Path, engine: str) -> tuple[Any, str]:
    """Store (SQLite in run_dir) + engine + gateway with capture on and the canary controller running."""
    from agentkiln.engine.factory import build_engine
    from agentkiln.engine.weight_roots import WeightsPolicy
    from agentkiln.production.capture import CaptureConfig
    from agentkiln.server.app import create_app
    from agentkiln.server.serve import ServerThread, own_resources
    from agentkiln.store import open_store

    store = open_store(str(run_dir / "kiln.db"))
    built = build_engine(engine)
    app = create_app(
        store,
        engine=built,
        weights_policy=WeightsPolicy.build([run_dir]),
        capture=CaptureConfig(enabled=True, redact=("email", "api_key")),
    )
    app.state.run_dirs = [run_dir]
    own_resources(app, store, built)
    server = ServerThread(app)
    return server, server.start(timeout=600)


def run_production_demo(config: Any, engine: str, console: Console) -> list[Any]:
    from agentkiln.demo.production import ProductionDemo
    from agentkiln.demo.tasks import make_tasks

    run_dir: Path = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if engine == "tiny" and config.model_dir is None:  # candidates must be trained on the model served
        from agentkiln.engine.model_files import tiny_model_dir

        config.model_dir = str(tiny_model_dir())
    tasks = make_tasks(200, seed=1, prefix="user")
    val = make_tasks(config.val_size, seed=2, prefix="val")
    console.print(
        f"[bold]AgentKiln production demo[/]: calculator agent deployed on plain /v1, "
        f"{config.rounds} rounds x {config.sessions_per_round} user sessions, thumbs {1 - config.noise:.0%} reliable, "
        f"canary share {config.canary_share:.0%}"
    )
    with console.status("starting server and model..."):
        server, url = start_production_server(run_dir, engine)
    model = "tiny" if engine == "tiny" else "smollm2"

    def on_round(report: Any) -> None:
        acc = ", ".join(f"{v}: {a:.2f}" for v, a in report.accuracy.items()) or "-"
        val_text = f"{report.val_accuracy:.3f}" if report.val_accuracy is not None else "(canary running)"
        console.print(
            f"round {report.round}: deployed {report.deployed_version} | val acc {val_text} | traffic acc {acc}"
            + (f" | canary: {report.canary}" if report.canary else "")
            + f" | {report.elapsed_s:.0f}s"
        )

    try:
        reports = ProductionDemo(url, config, model=model, on_round=on_round).run(tasks, val)
    finally:
        server.stop(timeout=60)
    (run_dir / "production_result.json").write_text(json.dumps([asdict(r) for r in reports], indent=2, default=str))
    table = Table(title="AgentKiln production demo: deployed version per round")
    for col in ("round", "deployed", "val accuracy", "traffic accuracy by version", "canary"):
        table.add_column(col)
    for r in reports:
        table.add_row(
            str(r.round), r.deployed_version, f"{r.val_accuracy:.3f}" if r.val_accuracy is not None else "-",
            ", ".join(f"{v}: {a:.2f}" for v, a in r.accuracy.items()) or "-", r.canary or "",
        )
    console.print(table)
    return reports
