"""`HttpStore`: the Store interface over the server's /api/v1 API, for runners on other machines.

Runners live on flaky networks and outlive server restarts, so every call retries network
failures and 5xx with exponential backoff (never 4xx: those are the caller's bug and would
fail again). Writes carry an `Idempotency-Key`, reused across the retries of one call, so a
retry after a lost answer gets the first answer back instead of doing the write twice.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import logging
import os
import random
import time
import uuid
from enum import Enum
from typing import Any, Optional, Sequence, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, TypeAdapter

from agentkiln.models import (
    Attempt,
    AttemptedRollout,
    AttemptError,
    AttemptStatus,
    Resources,
    ResourcesIn,
    Rollout,
    RolloutConfig,
    RolloutMode,
    RolloutStatus,
    Span,
    SpanIn,
    Worker,
    WorkerStatus,
)
from agentkiln.protocol import API_PREFIX, Headers, auth_headers
from agentkiln.store.base import InvalidTransitionError, NotFoundError, Store, StoreError, ValidationError
from agentkiln.store.client_production import HttpProduction
from agentkiln.store.client_responses import HttpResponses

log = logging.getLogger(__name__)

T = TypeVar("T")

_ERRORS: dict[int, type[StoreError]] = {404: NotFoundError, 409: InvalidTransitionError, 422: ValidationError}
# Connect/read/write errors, timeouts, a connection dropped mid-answer; not bad URLs or local misuse.
_RETRYABLE = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
# The server caps one long poll at 30 s; ask a little less so a proxy timeout never hits first.
WAIT_CHUNK_S = 25.0


class ServerError(StoreError):
    """The server kept failing (5xx) or could not be reached after all retries."""

    status_code = 503


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, Enum):
        return value.value
    return value


def _body(**fields: Any) -> dict[str, Any]:
    """Drop unset (None) keyword arguments: the server treats missing as 'no change'."""
    return {k: _jsonable(v) for k, v in fields.items() if v is not None}


def _error_from(response: httpx.Response) -> StoreError:
    try:
        payload = response.json()
        message = payload["error"]["message"]
    except Exception:
        message = response.text[:500] or response.reason_phrase
    cls = _ERRORS.get(response.status_code, StoreError)
    err = cls(message)
    if cls is StoreError:
        err.status_code = response.status_code
    return err


class HttpStore(HttpProduction, HttpResponses, Store):
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        retries: int = 5,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if api_key is None:  # so open_store("http://...") and runners pick up the key `kiln serve` reads
            api_key = os.environ.get("KILN_API_KEY") or None
        headers = auth_headers(api_key)
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    # ------------------------------------------------------------------ transport
    def _delay(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.backoff_s * (2**attempt))
        return base * (0.5 + random.random() / 2)  # jitter so many runners don't retry in lockstep

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Any = None,
        timeout: float | None = None,
    ) -> Any:
        headers = {Headers.idempotency_key: uuid.uuid4().hex} if method != "GET" else {}
        content = None
        if json is not None:
            try:
                content = jsonlib.dumps(json, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
            except (TypeError, ValueError) as exc:
                raise ValidationError(f"{method} {path}: body is not JSON-serializable: {exc}") from None
            headers["Content-Type"] = "application/json"
        request_timeout = self.timeout if timeout is None else timeout
        last: str = ""
        retry_after = 0.0
        for attempt in range(self.retries + 1):
            if attempt:
                delay = max(self._delay(attempt - 1), retry_after)
                log.warning("retrying %s %s in %.2fs (%s)", method, path, delay, last)
                await asyncio.sleep(delay)
            try:
                response = await self._client.request(
                    method, API_PREFIX + path, content=content, params=params, headers=headers, timeout=request_timeout
                )
            except _RETRYABLE as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code >= 500:
                last = f"HTTP {response.status_code}: {response.text[:200]}"
                retry_after = _retry_after_s(response) * (1 + random.random() / 2)  # spread the herd
                continue
            if response.status_code >= 400:
                raise _error_from(response)
            try:
                return response.json()
            except ValueError:
                raise ServerError(f"{method} {path}: answer is not JSON: {response.text[:200]!r}") from None
        raise ServerError(f"{method} {path} failed after {self.retries + 1} tries: {last}")

    @staticmethod
    def _parse(tp: type[T] | Any, data: Any) -> Any:
        return TypeAdapter(tp).validate_python(data)

    async def close(self) -> None:
        await self._client.aclose()

    # ------------------------------------------------------------------ rollouts
    async def enqueue_rollout(
        self,
        input: Any,
        *,
        mode: Optional[RolloutMode] = None,
        resources_id: Optional[str] = None,
        config: Optional[RolloutConfig] = None,
        metadata: Optional[dict[str, Any]] = None,
    ) -> Rollout:
        body = {
            "input": _jsonable(input),
            **_body(mode=mode, resources_id=resources_id, config=config, metadata=metadata),
        }
        return Rollout.model_validate(await self._request("POST", "/rollouts", json=body))

    async def enqueue_rollouts(self, items: Sequence[dict[str, Any]]) -> list[Rollout]:
        payload = [
            {"input": _jsonable(item.get("input")), **_body(**{k: v for k, v in item.items() if k != "input"})}
            for item in items
        ]
        data = await self._request("POST", "/rollouts/batch", json={"items": payload})
        return self._parse(list[Rollout], data)

    async def dequeue_rollout(self, worker_id: Optional[str] = None) -> Optional[AttemptedRollout]:
        data = await self._request("POST", "/dequeue", json=_body(worker_id=worker_id))
        return None if data is None else AttemptedRollout.model_validate(data)

    async def start_rollout(
        self,
        input: Any,
        *,
        mode: Optional[RolloutMode] = None,
        resources_id: Optional[str] = None,
        config: Optional[RolloutConfig] = None,
        metadata: Optional[dict[str, Any]] = None,
        worker_id: Optional[str] = None,
    ) -> AttemptedRollout:
        body = {
            "input": _jsonable(input),
            **_body(mode=mode, resources_id=resources_id, config=config, metadata=metadata, worker_id=worker_id),
        }
        return AttemptedRollout.model_validate(await self._request("POST", "/rollouts/start", json=body))

    async def get_rollout(self, rollout_id: str) -> Rollout:
        return Rollout.model_validate(await self._request("GET", f"/rollouts/{_seg(rollout_id)}"))

    async def query_rollouts(
        self,
        *,
        status: Optional[Sequence[RolloutStatus]] = None,
        mode: Optional[RolloutMode] = None,
        rollout_ids: Optional[Sequence[str]] = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Rollout]:
        params: list[tuple[str, Any]] = [("limit", limit), ("offset", offset)]
        if status is not None:
            if not status:
                return []  # "none of these statuses" matches nothing
            params += [("status", _jsonable(s)) for s in status]
        if mode is not None:
            params.append(("mode", _jsonable(mode)))
        if rollout_ids is not None:
            if not rollout_ids:
                return []
            params += [("rollout_id", rid) for rid in rollout_ids]
        return self._parse(list[Rollout], await self._request("GET", "/rollouts", params=params))

    async def update_rollout(
        self,
        rollout_id: str,
        *,
        status: Optional[RolloutStatus] = None,
        mode: Optional[RolloutMode] = None,
        resources_id: Optional[str] = None,
        config: Optional[RolloutConfig] = None,
        metadata: Optional[dict[str, Any]] = None,
    ) -> Rollout:
        body = _body(status=status, mode=mode, resources_id=resources_id, config=config, metadata=metadata)
        return Rollout.model_validate(await self._request("PATCH", f"/rollouts/{_seg(rollout_id)}", json=body))

    async def cancel_rollout(self, rollout_id: str) -> Rollout:
        return Rollout.model_validate(await self._request("POST", f"/rollouts/{_seg(rollout_id)}/cancel"))

    async def wait_for_rollouts(self, rollout_ids: Sequence[str], timeout: Optional[float] = None) -> list[Rollout]:
        """Long-polls in chunks of at most WAIT_CHUNK_S until all are finished or `timeout` passes."""
        ids = list(rollout_ids)
        wanted = set(ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            chunk = WAIT_CHUNK_S if deadline is None else max(0.0, min(WAIT_CHUNK_S, deadline - time.monotonic()))
            data = await self._request(
                "POST", "/rollouts/wait", json={"rollout_ids": ids, "timeout": chunk}, timeout=chunk + self.timeout
            )
            finished = self._parse(list[Rollout], data)
            if {r.rollout_id for r in finished} >= wanted:
                return finished
            if deadline is not None and time.monotonic() >= deadline:
                return finished

    # ------------------------------------------------------------------ attempts
    async def query_attempts(self, rollout_id: str) -> list[Attempt]:
        return self._parse(list[Attempt], await self._request("GET", f"/rollouts/{_seg(rollout_id)}/attempts"))

    async def get_latest_attempt(self, rollout_id: str) -> Optional[Attempt]:
        data = await self._request("GET", f"/rollouts/{_seg(rollout_id)}/attempts/latest")
        return None if data is None else Attempt.model_validate(data)

    async def update_attempt(
        self,
        rollout_id: str,
        attempt_id: str,
        *,
        status: Optional[AttemptStatus] = None,
        worker_id: Optional[str] = None,
        error: Optional[AttemptError] = None,
    ) -> Attempt:
        body = _body(status=status, worker_id=worker_id, error=error)
        path = f"/rollouts/{_seg(rollout_id)}/attempts/{_seg(attempt_id)}"
        return Attempt.model_validate(await self._request("PATCH", path, json=body))

    # ------------------------------------------------------------------ spans
    async def add_spans(self, spans: Sequence[SpanIn]) -> list[Span]:
        if not spans:
            return []
        return self._parse(list[Span], await self._request("POST", "/spans", json=_jsonable(list(spans))))

    async def query_spans(
        self,
        rollout_id: str,
        *,
        attempt_id: Optional[str] = None,
        name: Optional[str] = None,
        limit: int = 10_000,
        offset: int = 0,
    ) -> list[Span]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if attempt_id is not None:
            params["attempt_id"] = attempt_id
        if name is not None:
            params["name"] = name
        data = await self._request("GET", f"/rollouts/{_seg(rollout_id)}/spans", params=params)
        return self._parse(list[Span], data)

    # ------------------------------------------------------------------ resources
    async def add_resources(self, resources: ResourcesIn) -> Resources:
        return Resources.model_validate(await self._request("POST", "/resources", json=_jsonable(resources)))

    async def get_resources(self, resources_id: str) -> Resources:
        return Resources.model_validate(await self._request("GET", f"/resources/{_seg(resources_id)}"))

    async def get_latest_resources(self) -> Optional[Resources]:
        data = await self._request("GET", "/resources/latest")
        return None if data is None else Resources.model_validate(data)

    async def query_resources(self, *, limit: int = 100, offset: int = 0) -> list[Resources]:
        data = await self._request("GET", "/resources", params={"limit": limit, "offset": offset})
        return self._parse(list[Resources], data)

    # ------------------------------------------------------------------ workers
    async def heartbeat_worker(
        self,
        worker_id: str,
        *,
        status: Optional[WorkerStatus] = None,
        current_rollout_id: Optional[str] = None,
        current_attempt_id: Optional[str] = None,
        metadata: Optional[dict[str, Any]] = None,
    ) -> Worker:
        body = _body(
            status=status,
            current_rollout_id=current_rollout_id,
            current_attempt_id=current_attempt_id,
            metadata=metadata,
        )
        return Worker.model_validate(await self._request("POST", f"/workers/{_seg(worker_id)}/heartbeat", json=body))

    async def query_workers(self) -> list[Worker]:
        return self._parse(list[Worker], await self._request("GET", "/workers"))

    # ------------------------------------------------------------------ lifecycle
    async def check_timeouts(self, now: Optional[float] = None) -> list[Attempt]:
        """Ask the server to sweep now, on its own clock (admin key); a client cannot move that clock."""
        if now is not None:
            raise ValueError("the server sweeps on its own clock: check_timeouts(now=...) works on a local store only")
        return self._parse(list[Attempt], await self._request("POST", "/check-timeouts"))


def _seg(value: str) -> str:
    """Ids go into URL paths; quote them so a '?' or '#' in an id cannot change the request."""
    return quote(value, safe="")


MAX_RETRY_AFTER_S = 30.0


def _retry_after_s(response: httpx.Response) -> float:
    """The server's Retry-After in seconds (a shedding server says when to come back), capped; 0 if none."""
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(response.headers.get("retry-after", 0))))
    except ValueError:  # an HTTP date: fall back to the client's own backoff
        return 0.0
