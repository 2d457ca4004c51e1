"""examples/metagpt_agent.py: a MetaGPT Role whose Action asks the model through the gateway.

MetaGPT 0.8.2's pins conflict with ours (openai~=1.39, typer==0.9.0, ...), so it lives in its own
environment, `.venv-metagpt` (scripts/setup_metagpt.sh; scripts/test.sh builds it). The server and
the scripted engine run here, in the test process; the Role runs in a `kiln run` process of
`.venv-metagpt`, exactly as a user would start it, and the checks read what the store holds.
Without the venv the tests are skipped, except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from agentkiln.engine.base import ChatRequest
from agentkiln.protocol import SpanAttrs
from tests.gateway_fakes import ScriptedEngine
from tests.pg_fixtures import in_ci
from tests.test_frameworks_common import TASK, KilnServer, Run, assert_recorded, run_in_venv, serving, system_text

ROOT = Path(__file__).resolve().parent.parent
KILN = ROOT / ".venv-metagpt" / "bin" / "kiln"
MISSING = "MetaGPT needs its own environment: run `bash scripts/setup_metagpt.sh` to create .venv-metagpt"
ROLE_PROMPT = "You are a Calculator, named Cal, your goal is Answer arithmetic questions exactly."


@pytest.fixture(autouse=True)
def metagpt_venv() -> None:
    if not KILN.exists():
        if in_ci():
            pytest.fail(f"CI needs .venv-metagpt for these tests: {MISSING}")
        pytest.skip(MISSING)


@pytest.fixture
def kiln_server():
    yield from serving()


def role_env(home: Path) -> dict[str, str]:
    """The environment of the Role's process: no trace of this venv; an empty HOME (no ~/.metagpt)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.pop("METAGPT_PROJECT_ROOT", None)
    env["PATH"] = f"{KILN.parent}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(home)
    return env


async def run_role(server: KilnServer, home: Path, task: Any = TASK, *, sampling: dict[str, Any] | None = None) -> Run:
    """Enqueue `task`, run `kiln run examples.metagpt_agent:agent` in .venv-metagpt until the queue is empty."""
    return await run_in_venv(server, KILN, "examples.metagpt_agent:agent", role_env(home), task, sampling)


def calculator_policy(answer: str = "391") -> Any:
    """The Calculator's system prompt is MetaGPT's role prefix: answer it, and nothing else."""

    def policy(req: ChatRequest) -> str:
        if system_text(req).startswith(ROLE_PROMPT):
            return f"17 * 23 = {answer}. The answer is {answer}."
        return "I was not asked as the Calculator."

    return policy


async def test_role_call_is_recorded_with_its_prompts(kiln_server, tmp_path):
    engine = ScriptedEngine(calculator_policy())
    run = await run_role(kiln_server(engine), tmp_path)
    assert_recorded(run, n_calls=1, agent="calculator", reward=1.0)
    (call,) = run.calls
    messages = call.attributes[SpanAttrs.request]["messages"]
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"].startswith(ROLE_PROMPT)
    assert "Question: What is 17 * 23?" in messages[1]["content"]
    assert "The answer is 391." in str(call.attributes[SpanAttrs.response])
    assert not list(tmp_path.iterdir())  # nothing written to HOME (no ~/.metagpt)


async def test_wrong_answer_scores_zero(kiln_server, tmp_path):
    run = await run_role(kiln_server(ScriptedEngine(calculator_policy("390"))), tmp_path)
    assert_recorded(run, n_calls=1, agent="calculator", reward=0.0)


async def test_role_uses_the_published_sampling(kiln_server, tmp_path):
    engine = ScriptedEngine(calculator_policy())
    run = await run_role(kiln_server(engine), tmp_path, sampling={"temperature": 0.25, "max_tokens": 200})
    assert_recorded(run, n_calls=1, agent="calculator", reward=1.0)
    assert [(r.temperature, r.max_tokens) for r in engine.requests] == [(0.25, 200)]
