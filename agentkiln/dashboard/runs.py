"""Training runs for the dashboard: run folders (history.jsonl, result.json) and their rollouts' rewards.

A run is a folder holding the `history.jsonl` the training loop appends one record to per
step. The server looks in the run folders it was told about (`app.state.run_dirs`: the
Trainer's embedded server names its own) and in the children of the runs root
($KILN_RUNS_DIR, else ./runs, where `kiln demo` and `kiln train` write). Runs are addressed by
the key listed here only, never by a path from the request.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agentkiln.dashboard.queries import latest_train_rewards
from agentkiln.store.base import Store

log = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"  # training/loop.py writes it (not imported: the server needs no training stack)
RESULT_FILE = "result.json"
RUNS_ROOT_ENV = "KILN_RUNS_DIR"
MAX_HISTORY = 100_000  # records read from one history file
MAX_REWARD_ROLLOUTS = 2_000  # latest train rollouts whose rewards the runs page plots
_STEP = re.compile(r"^s(\d+)-")  # group ids of train rollouts: "s<step>-<task>"


def runs_root() -> Path:
    return Path(os.environ.get(RUNS_ROOT_ENV) or "runs")


def discover(run_dirs: Iterable[Path | str] = ()) -> dict[str, Path]:
    """Run key -> folder, for every folder holding a history file."""
    found: dict[str, Path] = {}
    candidates = [Path(p) for p in run_dirs]
    root = runs_root()
    if root.is_dir():
        candidates += [root, *sorted(p for p in root.iterdir() if p.is_dir())]
    for folder in candidates:
        if not (folder / HISTORY_FILE).is_file():
            continue
        resolved = folder.resolve()
        if resolved in found.values():
            continue
        key = base = folder.name or "run"
        n = 2
        while key in found:
            key, n = f"{base}-{n}", n + 1
        found[key] = resolved
    return found


def read_history(folder: Path) -> list[dict[str, Any]]:
    """The step records so far; a half-written last line (the loop is appending) is skipped."""
    path = folder / HISTORY_FILE
    records: list[dict[str, Any]] = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return records
    for line in lines[:MAX_HISTORY]:
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            records.append(value)
    return records


def run_info(key: str, folder: Path) -> dict[str, Any]:
    """History plus what the run folder says about resume points and the best checkpoint."""
    history = read_history(folder)
    result: dict[str, Any] = {}
    try:
        loaded = json.loads((folder / RESULT_FILE).read_text())
        result = loaded if isinstance(loaded, dict) else {}
    except (OSError, ValueError):
        pass
    steps = [h.get("step") for h in history if isinstance(h.get("step"), int)]
    # A resumed run appends to the same history: a step that does not follow the previous one marks a resume.
    resumes = [s for prev, s in itertools.pairwise(steps) if s <= prev]
    adapters = folder / "adapters"
    return {
        "key": key,
        "path": str(folder),
        "history": history,
        "val_before": result.get("val_before"),
        "val_after": result.get("val_after"),
        "best_val": result.get("best_val"),
        "best_checkpoint": result.get("best_checkpoint")
        or (str(folder / "best") if (folder / "best").is_dir() else None),
        "checkpoint": str(folder / "checkpoint") if (folder / "checkpoint").is_dir() else None,
        "adapters": sorted(p.name for p in adapters.iterdir() if p.is_dir()) if adapters.is_dir() else [],
        "resume_points": resumes,
        "finished": bool(result),
    }


def run_summaries(runs: dict[str, Path]) -> list[dict[str, Any]]:
    out = []
    for key, folder in runs.items():
        history = read_history(folder)
        last = history[-1] if history else {}
        out.append(
            {
                "key": key,
                "path": str(folder),
                "steps": len(history),
                "last": last,
                "mtime": (folder / HISTORY_FILE).stat().st_mtime,
            }
        )
    return sorted(out, key=lambda r: -r["mtime"])


async def rollout_rewards(store: Store, limit: int = MAX_REWARD_ROLLOUTS) -> list[dict[str, Any]]:
    """(step, reward) of the latest succeeded train rollouts, from their reward spans in the store."""
    points = []
    for rollout_id, metadata, reward in await latest_train_rewards(store, limit):
        match = _STEP.match(str(metadata.get("group_id", "")))
        if match is not None and reward is not None:
            points.append({"step": int(match[1]), "reward": reward, "rollout_id": rollout_id})
    return points


def find(runs: dict[str, Path], key: str) -> Path | None:
    return runs.get(key)
