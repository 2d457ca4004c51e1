"""A runner-only install (`pip install agentkiln`, no extras) has no torch and still runs agents.

The client SDK / runner is what every agent process imports, often on machines without a GPU
stack; the server, engine and trainer come with the `serve` / `train` extras. `.venv-crewai`
(scripts/setup_crewai.sh) is such an install (plus CrewAI), so it is checked here; the crew itself
runs through the runner in tests/test_frameworks_crewai.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LEAN_PY = ROOT / ".venv-crewai" / "bin" / "python"
HEAVY = ("torch", "transformers", "peft", "matplotlib", "gguf")
CLIENT_MODULES = (
    "agentkiln",
    "agentkiln.protocol",
    "agentkiln.runner",
    "agentkiln.runner.runner",
    "agentkiln.runner.sidecar",
    "agentkiln.store.client",
    "agentkiln.cli.main",
)


def test_client_modules_do_not_import_the_training_stack() -> None:
    """Even where torch is installed, importing the SDK must not load it (start-up time, memory)."""
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in CLIENT_MODULES)
        + f"loaded = [m for m in {HEAVY!r} + ('fastapi', 'uvicorn') if m in sys.modules]\n"
        + "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


@pytest.mark.skipif(not LEAN_PY.exists(), reason="run `bash scripts/setup_crewai.sh` to create .venv-crewai")
def test_runner_only_venv_has_no_torch_and_runs_the_cli() -> None:
    code = (
        "import importlib.util\n"
        f"present = [m for m in {HEAVY!r} if importlib.util.find_spec(m) is not None]\n"
        "assert not present, f'runner-only install pulled in {present}'\n"
        + "".join(f"import {m}\n" for m in CLIENT_MODULES)
        + "import agentkiln as kiln\n"
        "assert callable(kiln.rollout) and callable(kiln.emit_reward)\n"
    )
    subprocess.run([str(LEAN_PY), "-c", code], check=True, cwd=ROOT, timeout=120)
    out = subprocess.run(
        [str(LEAN_PY.parent / "kiln"), "run", "--help"], check=True, cwd=ROOT, timeout=120, capture_output=True
    )
    assert b"--server" in out.stdout
