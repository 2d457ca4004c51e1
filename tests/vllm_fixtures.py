"""A vLLM server from .venv-vllm (scripts/setup_vllm.sh) for the slow vLLM tests, started once per module.

Started with the exact command kiln's supervisor uses (engine/vllm/process.command), always in
fp32, as the tests' learners and embedded engines compute, so recorded logprobs can be compared
with theirs tightly. ("auto" would pick bf16 on CPUs with AVX512-BF16/AMX: there vLLM's
per-token logprobs differ from an fp32 learner's by up to ~0.2 nats on sampled responses,
too loose to tell a stale adapter from the right one; bf16 agreement is measured in
bench/RESULTS.md instead.) Without the venv the tests are skipped locally and fail in CI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agentkiln.engine import model_files
from agentkiln.engine.vllm.options import VLLMOptions, default_python
from agentkiln.engine.vllm.process import command, free_port, server_env

SERVED = "smollm2-135m-instruct"


def vllm_python() -> Path:
    python = default_python()
    if not python.exists():
        why = f"no vLLM venv at {python}: run bash scripts/setup_vllm.sh"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return python


def vllm_options(**overrides: object) -> VLLMOptions:
    return VLLMOptions(
        **{
            "model_dir": model_files.smollm2_dir(), "model_name": SERVED, "python": str(vllm_python()),
            "max_lora_rank": 16, "dtype": "float32", **overrides,
        }
    )


def start_vllm(log_path: Path) -> Iterator[str]:
    """Body of a fixture: yields the server's `/v1` URL; stops it (whole process group) at teardown."""
    options = vllm_options()
    port = free_port()
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            command(options, port), env=server_env(options), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, f"vLLM exited:\n{log_path.read_text()[-3000:]}"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"vLLM not healthy:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        body = {"model": SERVED, "prompt": [0], "max_tokens": 1}
        httpx.post(url + "/v1/completions", json=body, timeout=300)  # first request compiles kernels
        yield url + "/v1"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
