"""Shared fixtures. `store` runs a test once per backend: to add one, add a param and a branch in open_backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from agentkiln.store import InMemoryStore, SqliteStore, Store

STORE_KINDS = ["memory", "sqlite", "http", "postgres"]  # postgres: skipped without a server (see pg_fixtures)


@asynccontextmanager
async def open_backend(kind: str, tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh store of one kind, closed (and its server stopped, if any) afterwards."""
    if kind == "http":  # an InMemoryStore served by the real app on a loopback port, used through HttpStore
        from agentkiln.server.app import create_app
        from agentkiln.server.serve import ServerThread
        from agentkiln.store.client import HttpStore

        class ClockedHttpStore(HttpStore):
            """The server API takes no client clock; tests that move time sweep the backing store directly."""

            async def check_timeouts(self, now: float | None = None):  # type: ignore[override]
                if now is None:
                    return await super().check_timeouts()
                return await backing.check_timeouts(now=now)

        backing = InMemoryStore()
        server = ServerThread(create_app(backing, sweep_interval_s=0))
        try:
            async with ClockedHttpStore(server.start()) as client:
                yield client
        finally:
            server.stop()
            await backing.close()
        return
    if kind == "postgres":  # a fresh schema of the test server, dropped afterwards
        from tests.pg_fixtures import fresh_schema

        async with fresh_schema() as (url, schema):  # skips first when psycopg or the server is missing
            from agentkiln.store.postgres import PostgresStore

            pg = PostgresStore(url, schema=schema)
            try:
                yield pg
            finally:
                await pg.close()
        return
    if kind == "memory":
        store: Store = InMemoryStore()
    elif kind == "sqlite":
        store = SqliteStore(tmp_path / "store.db")
    else:
        raise ValueError(f"unknown store kind {kind}")
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with open_backend(request.param, tmp_path) as s:
        yield s
