"""What every learning algorithm (GRPO, SFT, APO) is handed, what it returns, and what it implements.

An algorithm only talks to the store (enqueue tasks, read spans, publish resources);
it never calls runners or the engine directly, so the same algorithm drives any agent.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from agentkiln.protocol import ENGINE_STATUS_PATH, auth_headers
from agentkiln.store.base import Store

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str, dict[str, Any]], None]


@dataclass
class TrainingContext:
    store: Store
    server_url: str
    run_dir: Path
    model_name: str = "smollm2-135m-instruct"
    api_key: str | None = None
    on_event: ProgressCallback = field(default=lambda kind, data: None)

    def _client(self) -> httpx.AsyncClient:
        headers = auth_headers(self.api_key)
        return httpx.AsyncClient(base_url=self.server_url, headers=headers, timeout=30)

    @staticmethod
    async def _engine_status(client: httpx.AsyncClient) -> dict[str, Any]:
        response = await client.get(ENGINE_STATUS_PATH)
        response.raise_for_status()
        return response.json()

    async def engine_status(self) -> dict[str, Any]:
        async with self._client() as client:
            return await self._engine_status(client)

    async def wait_for_resources_served(self, resources_id: str, timeout: float = 300.0) -> None:
        """Block until the server's engine serves `resources_id` (no rollout runs on stale weights)."""
        deadline = time.monotonic() + timeout
        async with self._client() as client:  # one connection for the whole poll, not one per poll
            while True:
                status = await self._engine_status(client)
                if status.get("engine") is None or status.get("loaded_resources_id") == resources_id:
                    return
                if status.get("last_error"):
                    raise RuntimeError(f"engine could not load {resources_id}: {status['last_error']}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"engine did not load resources {resources_id} within {timeout}s")
                await asyncio.sleep(0.1)


@dataclass
class TrainingResult:
    """Summary an algorithm returns from `run`; written as JSON next to its artifacts."""

    val_before: float | None = None
    val_after: float | None = None
    best_val: float | None = None
    best_checkpoint: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Algorithm(abc.ABC):
    @abc.abstractmethod
    async def run(
        self, ctx: TrainingContext, train_data: Sequence[Any], val_data: Sequence[Any] | None = None
    ) -> TrainingResult: ...
