"""HttpStore retries what may succeed next time (network errors, 5xx), never 4xx, and maps errors back."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import httpx
import pytest

from agentkiln.models import AttemptStatus, RolloutConfig, RolloutStatus, SpanIn
from agentkiln.server.app import create_app
from agentkiln.server.serve import ServerThread
from agentkiln.store import client as client_mod
from agentkiln.store.base import InvalidTransitionError, NotFoundError, StoreError, ValidationError
from agentkiln.store.client import HttpStore, ServerError
from agentkiln.store.memory import InMemoryStore

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


def _mock(handler: Handler, **kw: object) -> HttpStore:
    return HttpStore("http://kiln.test", transport=httpx.MockTransport(handler), backoff_s=0, **kw)  # type: ignore[arg-type]


def _err(status: int, type_: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"type": type_, "message": message}})


async def test_retries_5xx_then_succeeds() -> None:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) < 3:
            return _err(503, "InternalError", "busy")
        return httpx.Response(200, content=b"null")

    store = _mock(handler)
    assert await store.dequeue_rollout("w1") is None
    assert len(seen) == 3
    keys = {r.headers["idempotency-key"] for r in seen}
    assert len(keys) == 1  # one logical write, one key across its retries
    await store.close()


@pytest.mark.parametrize("exc", [httpx.ConnectError("refused"), httpx.ReadError("reset"), httpx.ReadTimeout("slow")])
async def test_retries_network_errors(exc: Exception) -> None:
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise exc
        return httpx.Response(200, json=[])

    store = _mock(handler)
    assert await store.query_workers() == []
    assert calls == 3
    await store.close()


async def test_gives_up_after_retries() -> None:
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("down")

    store = _mock(handler, retries=3)
    with pytest.raises(ServerError, match="4 tries.*ConnectError"):
        await store.query_workers()
    assert calls == 4
    await store.close()


@pytest.mark.parametrize(
    "status,cls",
    [(404, NotFoundError), (409, InvalidTransitionError), (422, ValidationError), (400, StoreError), (401, StoreError)],
)
async def test_4xx_not_retried_and_mapped(status: int, cls: type[StoreError]) -> None:
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return _err(status, "X", f"server says {status}")

    store = _mock(handler)
    with pytest.raises(cls, match=f"server says {status}") as info:
        await store.get_rollout("ro-1")
    assert type(info.value) is cls and info.value.status_code == status
    assert calls == 1
    await store.close()


async def test_non_json_error_body_still_mapped() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, text="plain not found")

    store = _mock(handler)
    with pytest.raises(NotFoundError, match="plain not found"):
        await store.get_rollout("x")
    await store.close()


class _LoseFirstAnswer(httpx.AsyncBaseTransport):
    """Delivers the request to the app, then drops its answer once: the classic lost-response case."""

    def __init__(self, app: object) -> None:
        self.inner = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        self.dropped = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.method != "GET" and self.dropped == 0:
            self.dropped += 1
            raise httpx.ReadError("connection reset after the server answered")
        return response


async def test_retry_after_lost_answer_does_not_repeat_the_write() -> None:
    backing = InMemoryStore(sweep_interval_s=None)
    transport = _LoseFirstAnswer(create_app(backing, sweep_interval_s=0))
    store = HttpStore("http://kiln.test", transport=transport, backoff_s=0)
    rollout = await store.enqueue_rollout({"q": 1})
    assert transport.dropped == 1
    assert [r.rollout_id for r in await backing.query_rollouts()] == [rollout.rollout_id]
    await store.close()


@pytest.fixture
def served() -> object:
    backing = InMemoryStore(sweep_interval_s=None)
    with ServerThread(create_app(backing, api_key="k", sweep_interval_s=0)) as server:
        yield server.url


async def test_round_trip_against_real_server(served: str) -> None:
    store = HttpStore(served, api_key="k", backoff_s=0)
    r = await store.enqueue_rollout("task", config=RolloutConfig(max_attempts=2))
    assert r.status == RolloutStatus.queuing and r.config.max_attempts == 2
    got = await store.dequeue_rollout("w1")
    assert got is not None and got.rollout.rollout_id == r.rollout_id
    spans = await store.add_spans([SpanIn(rollout_id=r.rollout_id, attempt_id=got.attempt.attempt_id, name="s")])
    assert spans[0].sequence_id == 1
    assert (await store.query_spans(r.rollout_id, attempt_id="latest"))[0].span_id == spans[0].span_id
    with pytest.raises(NotFoundError):
        await store.get_rollout("ro-nope")
    await store.update_attempt(r.rollout_id, got.attempt.attempt_id, status=AttemptStatus.succeeded)
    with pytest.raises(InvalidTransitionError):
        await store.update_rollout(r.rollout_id, status=RolloutStatus.queuing)
    assert await store.query_rollouts(status=[]) == []
    assert [x.rollout_id for x in await store.query_rollouts(status=[RolloutStatus.succeeded])] == [r.rollout_id]
    await store.close()

    with pytest.raises(StoreError, match="API key") as info:
        async with HttpStore(served, api_key="wrong") as bad:
            await bad.query_workers()
    assert info.value.status_code == 401


async def test_wait_loops_over_short_server_polls(served: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_mod, "WAIT_CHUNK_S", 0.05)  # many polls before the rollout finishes
    store = HttpStore(served, api_key="k", backoff_s=0)
    got = await store.start_rollout("t")
    rid = got.rollout.rollout_id

    async def finish_later() -> None:
        for _ in range(5):  # let a few polls come back empty first
            assert await store.wait_for_rollouts([rid], timeout=0) == []
        await store.update_attempt(rid, got.attempt.attempt_id, status=AttemptStatus.succeeded)

    waiter = asyncio.create_task(store.wait_for_rollouts([rid]))  # no timeout: loops until finished
    await finish_later()
    done = await asyncio.wait_for(waiter, 30)
    assert [d.rollout_id for d in done] == [rid] and done[0].status == RolloutStatus.succeeded
    assert await store.wait_for_rollouts([rid], timeout=0.01) == done
    await store.close()


async def test_unserializable_body_is_a_validation_error_without_a_request() -> None:
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(200, json={})

    store = _mock(handler)
    with pytest.raises(ValidationError, match="not JSON-serializable"):
        await store.enqueue_rollout({"x": object()})
    with pytest.raises(ValidationError, match="not JSON-serializable"):
        await store.enqueue_rollout(float("nan"))
    assert calls == 0
    await store.close()
