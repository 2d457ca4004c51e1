"""A server without a key is reachable from loopback only, and only under a loopback Host name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from agentkiln.server.app import create_app
from agentkiln.server.host_check import LOOPBACK_HOSTS, UnsafeBindError, check_bind
from agentkiln.server.serve import serve_async
from agentkiln.store.memory import InMemoryStore


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.org"])
async def test_serving_beyond_loopback_without_a_key_is_refused(host: str, tmp_path: Path) -> None:
    db = tmp_path / "kiln.db"
    with pytest.raises(UnsafeBindError, match="without an API key"):
        await serve_async(str(db), host=host, port=0)
    assert not db.exists()  # refused before anything was opened


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_or_a_key_may_serve(host: str) -> None:
    check_bind(host, None)
    check_bind("0.0.0.0", "a-key")


def test_kiln_serve_cli_refuses_with_a_clear_message(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agentkiln.cli.main", "serve", "--host", "0.0.0.0", "--engine", "none",
         "--store", str(tmp_path / "kiln.db")],
        capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "KILN_LOG_LEVEL": "WARNING"},
    )  # fmt: skip
    assert out.returncode != 0
    assert "without an API key" in out.stderr


@pytest.mark.parametrize(
    ("host", "status"),
    [("127.0.0.1:4747", 200), ("localhost", 200), ("[::1]:4747", 200), ("evil.example", 400),
     ("evil.example:4747", 400), ("127.0.0.1.evil.example", 400), ("", 400)],
)  # fmt: skip
def test_host_header_must_name_loopback(host: str, status: int) -> None:
    app = create_app(InMemoryStore(), sweep_interval_s=0, allowed_hosts=LOOPBACK_HOSTS)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        r = client.get("/health", headers={"host": host})
        assert r.status_code == status
        if status == 400:
            assert r.json()["error"]["type"] == "InvalidHost"
        r = client.post("/api/v1/rollouts", json={"input": 1}, headers={"host": host})
        assert r.status_code == (200 if status == 200 else 400)
