"""The real server app (InMemoryStore + the tiny random-init engine) on a loopback port, for gateway tests.

Not a test module; test_gateway_limits.py and test_gateway_fuzz.py import it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from agentkiln.protocol import attempt_base_url
from agentkiln.server.app import create_app
from agentkiln.server.serve import ServerThread
from agentkiln.store.memory import InMemoryStore


@dataclass
class TinyServer:
    url: str
    engine: Any  # TransformersEngine
    store: InMemoryStore
    server: ServerThread

    def attempt_base(self) -> str:
        """The per-attempt OpenAI base URL of a fresh rollout (calls there are recorded as spans)."""
        resp = httpx.post(f"{self.url}/api/v1/rollouts/start", json={"input": {"task": "t"}}, timeout=30)
        resp.raise_for_status()
        ar = resp.json()
        return attempt_base_url(self.url, ar["rollout"]["rollout_id"], ar["attempt"]["attempt_id"])


@contextmanager
def tiny_server(**engine_kwargs: Any) -> Iterator[TinyServer]:
    from agentkiln.engine.embedded import TransformersEngine
    from agentkiln.engine.model_files import tiny_model_dir

    engine_kwargs.setdefault("num_threads", 1)  # the test machines are small and shared
    engine = TransformersEngine(tiny_model_dir(), model_name="tiny", dtype="float32", **engine_kwargs)
    store = InMemoryStore(sweep_interval_s=None)
    app = create_app(store, sweep_interval_s=0, engine=engine, model_sync_interval_s=0)
    server = ServerThread(app)
    url = server.start()
    try:
        yield TinyServer(url, engine, store, server)
    finally:
        server.stop()
        asyncio.run(engine.close())
