"""PNG plots of training history (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_reward_history(
    history: Sequence[dict[str, Any]], path: str | Path, *, val_before: float | None = None, title: str = ""
) -> Path:
    """Train reward per step (line) and validation reward (markers), step 0 = before training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    steps = [h["step"] for h in history]
    ax.plot(steps, [h.get("train_reward", 0.0) for h in history], label="train reward (sampled)", color="#4c72b0")
    val = [(h["step"], h["val_reward"]) for h in history if "val_reward" in h]
    if val_before is not None:
        val.insert(0, (0, val_before))
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", label="validation accuracy (greedy)", color="#dd8452")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("reward")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title or "AgentKiln GRPO: reward per step")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
