"""The README's `kiln serve` / `kiln run` / `kiln dev` lines as a new user runs them: a fresh store,
nothing published, `--engine tiny`. The agents' `llm` is the server's own engine."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from agentkiln.models import AttemptStatus
from agentkiln.runner.server_llm import MissingLLM, NoLLMError

ROOT = Path(__file__).resolve().parents[1]
KILN = str(Path(sys.executable).parent / "kiln")

# The README's own agent ("Using it with your own agent"), saved as mymodule.py.
MYMODULE = textwrap.dedent(
    """
    import agentkiln as kiln
    from openai import OpenAI

    @kiln.rollout
    def my_agent(task, llm):
        client = OpenAI(base_url=llm.base_url, api_key=llm.api_key)   # the only AgentKiln touch
        reply = client.chat.completions.create(model=llm.model, messages=[{"role": "user", "content": task["q"]}])
        return 1.0 if task["a"] in reply.choices[0].message.content else 0.0   # the reward
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _readme_line(prefix: str) -> str:
    """The README line starting with `prefix`, without its trailing comment."""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith(prefix):
            return line.split("  #")[0].strip()
    raise AssertionError(f"README has no line starting with {prefix!r}")


def _as_run_here(line: str, port: int, tmp: Path) -> list[str]:
    """The README line with only what a test must change: the free port, the temp store, the tiny engine."""
    line = line.replace("4747", str(port)).replace("runs/kiln.db", str(tmp / "kiln.db"))
    line = line.replace("--engine smollm2", "--engine tiny")
    argv = shlex.split(line)
    assert argv[0] == "kiln"
    if argv[1] == "serve":
        argv += ["--port", str(port)]  # the README's default port may be taken on a test machine
        # The tiny random model never stops on its own: a server cap keeps each call short (the
        # README's real model stops at its end token).
        argv += ["--max-tokens-default", "32"]
    return [KILN, *argv[1:]]


@pytest.fixture
def served(tmp_path):
    (tmp_path / "mymodule.py").write_text(MYMODULE)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("KILN_API_KEY", None)
    port = _free_port()
    serve = _as_run_here(_readme_line("kiln serve --store"), port, tmp_path)
    assert "--engine" in serve and "tiny" in serve
    proc = subprocess.Popen(serve, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).json()["data"]:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "kiln serve did not come up"
        time.sleep(0.5)
    assert httpx.get(f"{url}/api/v1/resources/latest", timeout=5).status_code in (404, 200)
    try:
        yield url, port, tmp_path, env
    finally:
        _stop(proc)


def _wait_succeeded(url: str, rollout_id: str, timeout_s: float = 240) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/api/v1/rollouts/{rollout_id}", timeout=30).json()
        except httpx.TimeoutException:  # a shared test machine can be slow to answer; keep asking
            continue
        if r["status"] in ("succeeded", "failed", "cancelled"):
            return r
        time.sleep(0.5)
    raise AssertionError(f"rollout {rollout_id} did not finish")


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C as a user would (twice: kill), then make sure it is gone."""
    for _ in range(2):
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.wait(timeout=10)


def _attempts(url: str, rollout_id: str) -> list[dict]:
    return httpx.get(f"{url}/api/v1/rollouts/{rollout_id}/attempts", timeout=30).json()


@pytest.mark.slow  # several processes (server, dev, runners, example) starting the tiny engine
@pytest.mark.timeout(600)
def test_readme_serve_run_dev_on_a_fresh_store(served):
    url, port, tmp, env = served
    # kiln dev, as written in the README (the server, the tiny engine, nothing published).
    dev = _as_run_here(_readme_line("kiln dev mymodule:my_agent"), port, tmp)
    done = subprocess.run(dev, cwd=tmp, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout

    # kiln run, as written, with rollouts enqueued over HTTP; and the repo's openai SDK example.
    tasks = [{"q": "2+2", "a": "4"}]
    ids = [httpx.post(f"{url}/api/v1/rollouts", json={"input": t}, timeout=30).json()["rollout_id"] for t in tasks]
    run = _as_run_here(_readme_line("kiln run mymodule:my_agent"), port, tmp)
    example = [KILN, "run", "examples.openai_sdk_agent:agent", "--server", url, "-n", "1", "--until-empty"]
    procs = [subprocess.Popen(run, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)]
    try:
        for rid in ids:
            r = _wait_succeeded(url, rid)
            assert r["status"] == "succeeded", _attempts(url, rid)
    finally:
        _stop(procs[0])
    ex_id = httpx.post(f"{url}/api/v1/rollouts", json={"input": {"question": "What is 2+3?", "answer": 5}}, timeout=30).json()
    done = subprocess.run(example, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = _wait_succeeded(url, ex_id["rollout_id"])
    assert r["status"] == "succeeded", _attempts(url, ex_id["rollout_id"])
    assert all(a["status"] == AttemptStatus.succeeded.value for a in _attempts(url, ex_id["rollout_id"]))


def test_no_engine_error_says_what_to_publish():
    llm = MissingLLM("no resources name an LLM and the server at http://x has no engine")
    with pytest.raises(NoLLMError, match="kiln serve --engine") as exc:
        llm.for_agent("solver")
    assert "publish" in str(exc.value) and "llm.for_agent" in str(exc.value)
    assert not llm
