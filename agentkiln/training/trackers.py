"""Experiment trackers, chosen the way TRL's `report_to` chooses them: "tensorboard", "wandb", "none".

A tracker listens to the training events (`on_event(kind, data)`: "step" records from
`Run.record`, "validation" scores) and writes each step's numbers as scalars; the loop
itself knows nothing about trackers. TensorBoard's files go to `run_dir/tensorboard`
(open them with `tensorboard --logdir runs/demo/tensorboard`); W&B runs offline unless
WANDB_MODE says otherwise, under `run_dir/wandb` (`wandb sync runs/demo/wandb/offline-run-*`
uploads one later).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
REPORTERS = ("tensorboard", "wandb", "none")
EventHandler = Callable[[str, dict[str, Any]], None]


class Tracker(Protocol):
    def on_event(self, kind: str, data: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def _scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric fields of a step record, nested ones (per-agent metrics) as "agents/<name>/<key>"."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_scalars(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


class TensorBoardTracker:
    """Writes step metrics with TensorBoard's SummaryWriter (torch's, else tensorboardX's)."""

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch without the tensorboard package
            from tensorboardX import SummaryWriter  # type: ignore[no-redef]
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "step":
            step = int(data.get("step", 0))
            for name, value in _scalars({k: v for k, v in data.items() if k != "step"}).items():
                self.writer.add_scalar(f"train/{name}", value, step)
            self.writer.flush()  # a dashboard or `tensorboard` reading the run live sees every step
        elif kind == "validation" and data.get("tag") == "before" and isinstance(data.get("reward"), (int, float)):
            self.writer.add_scalar("train/val_reward", float(data["reward"]), 0)
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """Logs step metrics to Weights & Biases, offline by default (nothing leaves the machine)."""

    def __init__(self, run_dir: str | Path, project: str = "agentkiln") -> None:
        import os

        import wandb

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", project),
            name=run_dir.name,
            dir=str(run_dir),
            mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "step":
            values = _scalars({k: v for k, v in data.items() if k != "step"})
            self.run.log({f"train/{k}": v for k, v in values.items()}, step=int(data.get("step", 0)))
        elif kind == "validation" and data.get("tag") == "before" and isinstance(data.get("reward"), (int, float)):
            self.run.log({"train/val_reward": float(data["reward"])}, step=0)

    def close(self) -> None:
        self.run.finish()


def build_trackers(report_to: str | Sequence[str] | None, run_dir: str | Path) -> list[Tracker]:
    """The trackers `report_to` names ("tensorboard", "wandb", "none", or a list of them)."""
    names = [report_to] if isinstance(report_to, str) or report_to is None else list(report_to)
    trackers: list[Tracker] = []
    for name in names:
        if name in (None, "none"):
            continue
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(Path(run_dir) / TENSORBOARD_DIR))
        elif name == "wandb":
            trackers.append(WandbTracker(run_dir))
        else:
            raise ValueError(f"unknown report_to {name!r}: use one of {', '.join(REPORTERS)}")
    return trackers


def with_trackers(on_event: EventHandler | None, trackers: Sequence[Tracker]) -> EventHandler:
    """An event handler that feeds every tracker, then the caller's own handler.

    A failing tracker is logged, never fatal: losing a chart must not stop a training run.
    """

    def handle(kind: str, data: dict[str, Any]) -> None:
        for tracker in trackers:
            try:
                tracker.on_event(kind, data)
            except Exception:
                log.exception("tracker %s failed on a %s event", type(tracker).__name__, kind)
        if on_event is not None:
            on_event(kind, data)

    return handle
