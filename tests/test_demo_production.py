"""`kiln demo --production` as a user runs it, on the tiny engine: the loop's plumbing end to end
(deploy, capture, thumbs, offline GRPO, candidate, canary, decision, per-round report)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_kiln_demo_production_runs_its_rounds(tmp_path: Path) -> None:
    run_dir = tmp_path / "prod"
    cmd = [sys.executable, "-m", "agentkiln.cli.main", "demo", "--production", "--engine", "tiny",
           "--rounds", "2", "--sessions", "8", "--val-size", "4", "--n-runners", "4", "--run-dir", str(run_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rounds = json.loads((run_dir / "production_result.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[0]["val_accuracy"] is not None and rounds[0]["sessions"] == 8
    assert rounds[1]["trained"] is not None and rounds[1]["trained"]["sessions"] == 8  # round 0's sessions
    assert "round 2:" in out.stdout and "production demo" in out.stdout
