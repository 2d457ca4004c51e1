"""A curriculum sampler: pick training tasks by how informative they are for GRPO right now.

A GRPO group whose rollouts all succeed (or all fail) has zero advantage everywhere: it costs
a full sampling round and teaches nothing. The sampler keeps a (decayed) success rate per task
and weights a task by p(1 - p) (scaled to 1 at p = 0.5), so tasks the model sometimes solves
come first; unseen tasks get `unseen_weight` so everything is tried once, and solved or
hopeless tasks keep `min_weight` so they are revisited as the model changes.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def default_task_key(task: Any) -> str:
    """task["id"] when the task is a dict with an id, else a hash of its JSON."""
    if isinstance(task, dict) and "id" in task:
        return str(task["id"])
    blob = json.dumps(task, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


@dataclass
class TaskStats:
    n: float = 0.0  # decayed number of rollouts seen
    successes: float = 0.0  # decayed number of successes

    @property
    def rate(self) -> float | None:
        return self.successes / self.n if self.n > 0 else None


@dataclass
class Curriculum:
    """Weighted sampling of tasks by measured difficulty; deterministic for a seed and a record history.

    success_reward: a rollout with at least this reward counts as a success.
    decay: old counts are multiplied by this before each new record of the task (1 = plain counts).
    """

    seed: int = 0
    success_reward: float = 1.0
    unseen_weight: float = 1.0
    min_weight: float = 0.05
    decay: float = 0.8
    key: Callable[[Any], str] = default_task_key
    stats: dict[str, TaskStats] = field(default_factory=dict)
    draws: int = 0

    def record(self, task: Any, rewards: Sequence[float]) -> None:
        """Add the rewards of one task's rollouts (e.g. a GRPO group)."""
        if not rewards:
            return
        s = self.stats.setdefault(self.key(task), TaskStats())
        s.n = s.n * self.decay + len(rewards)
        s.successes = s.successes * self.decay + sum(1 for r in rewards if r >= self.success_reward)

    def weight(self, task: Any) -> float:
        s = self.stats.get(self.key(task))
        rate = s.rate if s is not None else None
        if rate is None:
            return self.unseen_weight
        return max(self.min_weight, 4.0 * rate * (1.0 - rate))

    def sample(self, tasks: Sequence[Any], k: int) -> list[int]:
        """Indices of k distinct tasks (fewer if there are fewer tasks), drawn by weight without replacement.

        Each call uses its own RNG stream (seed, draw number), so a resumed run draws the same.
        """
        rng = random.Random(f"{self.seed}-{self.draws}")
        self.draws += 1
        # Efraimidis-Spirakis: top-k of u^(1/w) is weighted sampling without replacement.
        keyed = []
        for i, task in enumerate(tasks):
            w = self.weight(task)
            u = rng.random()
            keyed.append((u ** (1.0 / w) if w > 0 else 0.0, -i))
        keyed.sort(reverse=True)
        return [-i for _, i in keyed[: min(k, len(tasks))]]

    def summary(self) -> dict[str, float]:
        """Counts of seen tasks by band: learnable (0 < p < 1), solved (p = 1), failing (p = 0)."""
        rates = [s.rate for s in self.stats.values() if s.rate is not None]
        return {
            "seen": float(len(rates)),
            "learnable": float(sum(1 for r in rates if 0.0 < r < 1.0)),
            "solved": float(sum(1 for r in rates if r >= 1.0)),
            "failing": float(sum(1 for r in rates if r <= 0.0)),
        }

    # ------------------------------------------------------------------ persistence (resume)
    def save(self, path: str | Path) -> None:
        data = {"draws": self.draws, "stats": {k: [s.n, s.successes] for k, s in self.stats.items()}}
        Path(path).write_text(json.dumps(data))

    def load(self, path: str | Path) -> None:
        data = json.loads(Path(path).read_text())
        self.draws = int(data["draws"])
        self.stats = {k: TaskStats(n=v[0], successes=v[1]) for k, v in data["stats"].items()}
