"""Past its bound on requests in flight the server answers 503 + Retry-After (JSON, connection kept); clients wait that long."""

from __future__ import annotations

import asyncio
import logging
import re

import httpx
import pytest

from agentkiln.server.app import create_app
from agentkiln.server.serve import ServerThread, connection_limit
from agentkiln.store.client import HttpStore
from agentkiln.store.memory import InMemoryStore


@pytest.fixture
def busy_server():
    """A server that serves at most 2 requests at once."""
    store = InMemoryStore(sweep_interval_s=None)
    thread = ServerThread(create_app(store, sweep_interval_s=0, max_in_flight=2))
    url = thread.start()
    yield url
    thread.stop()


async def _hold_two_slots(url: str, rollout_id: str) -> list[asyncio.Task]:
    """Two long polls on a rollout that does not finish: both slots taken for ~2 s."""
    async with httpx.AsyncClient(base_url=url) as probe:
        holders = [
            asyncio.create_task(
                httpx.AsyncClient(base_url=url, timeout=10).post(
                    "/api/v1/rollouts/wait", json={"rollout_ids": [rollout_id], "timeout": 2.0}
                )
            )
            for _ in range(2)
        ]
        for _ in range(200):  # until the server refuses: both long polls are in flight
            if (await probe.get("/api/v1/rollouts")).status_code == 503:
                return holders
            await asyncio.sleep(0.01)
    raise AssertionError("the two long polls never filled the server")


async def test_over_the_bound_503_with_retry_after_and_json(busy_server):
    async with HttpStore(busy_server) as store:
        rollout = await store.enqueue_rollout({"q": 1})
    holders = await _hold_two_slots(busy_server, rollout.rollout_id)
    async with httpx.AsyncClient(base_url=busy_server) as client:
        refused = await client.get("/api/v1/rollouts")
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.headers.get("connection", "").lower() != "close"  # kept for the retry
        assert refused.json()["error"]["type"] == "ServiceUnavailable"
        assert "in flight" in refused.json()["error"]["message"]
        assert (await client.get("/health")).status_code == 200  # probes still answer
        await asyncio.gather(*holders)
        assert (await client.get("/api/v1/rollouts")).status_code == 200  # slots free again


async def test_http_store_waits_retry_after_then_succeeds(busy_server, caplog):
    async with HttpStore(busy_server) as store:
        rollout = await store.enqueue_rollout({"q": 1})
        holders = await _hold_two_slots(busy_server, rollout.rollout_id)
        with caplog.at_level(logging.WARNING, logger="agentkiln.store.client"):
            got = await store.get_rollout(rollout.rollout_id)  # refused first, served once the polls end
        await asyncio.gather(*holders)
    assert got.rollout_id == rollout.rollout_id
    delays = [float(m) for m in re.findall(r"retrying GET \S+ in ([0-9.]+)s \(HTTP 503", caplog.text)]
    assert delays and all(d >= 1.0 for d in delays)  # the server's Retry-After, not the 0.1-0.2 s backoff


def test_connection_bound_is_not_the_request_bound():
    """uvicorn's limit counts idle keep-alive connections: it must stay far above 1,024 requests in flight."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"this machine allows only {hard} descriptors")
    assert connection_limit() >= 2048
