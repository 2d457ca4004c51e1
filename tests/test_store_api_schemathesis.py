"""schemathesis against the store API of a real server: no 500s, no undocumented statuses, no bad input accepted.

The app is `kiln serve`'s (create_app over a SqliteStore, with an admin key), served by
ServerThread on a loopback port; schemathesis runs every phase (examples, coverage, fuzzing,
stateful: sequences that follow the links it infers from the OpenAPI, enqueue -> get ->
update -> cancel...) with every check. The gateway and the OTLP intake are fuzzed elsewhere.
A fixed seed keeps the run reproducible; SCHEMATHESIS_MAX_EXAMPLES raises its depth locally.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agentkiln.models import CanaryIn, ResourcesIn
from agentkiln.server.app import create_app
from agentkiln.server.serve import ServerThread
from agentkiln.store.sqlite import SqliteStore

KEY = "schemathesis-admin-key"
CLI = Path(sys.executable).with_name("schemathesis")
MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "12"))
# Not the store API: the OpenAI-compatible gateway (its own fuzz test) and the OTLP intake (protobuf).
EXCLUDED = r"^/(v1/|rollout/|api/v1/engine)"

pytestmark = pytest.mark.skipif(not CLI.exists(), reason="schemathesis is not installed (pip install -e '.[dev]')")


def _run(url: str, report_dir: Path) -> subprocess.CompletedProcess[str]:
    command = [
        str(CLI),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        "13",
        "--workers",
        "1",  # several threads trip a CPython 3.11 ast.parse bug in hypothesis' reprs
        "--exclude-path-regex",
        EXCLUDED,
        "--header",
        f"Authorization: Bearer {KEY}",
        "--request-timeout",
        "40",  # above the long poll's 30 s cap
        "--suppress-health-check",
        "all",
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(report_dir),
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "", "NO_COLOR": "1"}
    # cwd: schemathesis keeps its example database in ./.schemathesis
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=report_dir.parent)


async def _seed_canary(store: SqliteStore) -> str:
    """A running canary, so the routes under /canaries/{canary_id} are reached (its id goes in the config)."""
    await store.add_resources(ResourcesIn())
    candidate = await store.add_resources(ResourcesIn(candidate=True))
    return (await store.start_canary(CanaryIn(candidate_resources_id=candidate.resources_id))).canary_id


def test_store_api_passes_schemathesis(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.db", sweep_interval_s=None)
    canary_id = asyncio.run(_seed_canary(store))
    (tmp_path / "schemathesis.toml").write_text(f'[parameters]\ncanary_id = "{canary_id}"\n')  # read from the cwd
    app = create_app(store, api_key=KEY, sweep_interval_s=0)
    with ServerThread(app) as server:
        result = _run(server.url, tmp_path / "report")
    output = result.stdout + result.stderr
    summary = output[output.find("SUMMARY") :] if "SUMMARY" in output else output[-6000:]
    assert result.returncode == 0, f"schemathesis found problems:\n{output[-20000:]}"
    assert "No issues found" in output, summary
    for phase in ("Coverage", "Fuzzing", "Stateful"):
        assert re.search(rf"✅\s+{phase}", summary), f"phase {phase} did not run and pass:\n{summary}"
    links = re.search(r"API Links:\s+(\d+) covered", output)
    assert links and int(links.group(1)) >= 5, f"the stateful phase followed too few links:\n{summary}"
    cases = re.search(r"(\d+) generated, (\d+) passed", output)
    assert cases and int(cases.group(1)) >= 500, summary
