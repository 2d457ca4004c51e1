"""A reachable PostgreSQL for tests: URL from KILN_TEST_POSTGRES_URL, one fresh schema per test.

Without a server the PostgreSQL tests are skipped, except in CI (CI=true), where they fail:
a CI run must never pass by quietly testing nothing.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

DEFAULT_URL = "postgresql://root@127.0.0.1:5432/test"


def postgres_url() -> str:
    return os.environ.get("KILN_TEST_POSTGRES_URL", DEFAULT_URL)


@functools.cache
def _unreachable_reason() -> str | None:
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'agentkiln[postgres]')"
    try:
        with psycopg.connect(postgres_url(), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any failure means no usable server
        return f"no PostgreSQL at {postgres_url()}: {exc}"
    return None


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


def import_psycopg_or_skip_module() -> Any:
    """psycopg for a test module; without it the module is skipped (outside CI) or fails (in CI)."""
    try:
        import psycopg
    except ImportError:
        if in_ci():
            raise
        pytest.skip("psycopg is not installed (pip install 'agentkiln[postgres]')", allow_module_level=True)
    return psycopg


def require_postgres() -> str:
    """The server URL; skips the test when none is reachable (fails in CI)."""
    reason = _unreachable_reason()
    if reason is not None:
        if in_ci():
            pytest.fail(f"CI needs PostgreSQL for these tests: {reason}")
        pytest.skip(reason)
    return postgres_url()


_DROP_TRIES = 3
_HOLDERS = (  # sessions holding locks on the schema's tables: a failed test's leftover tasks
    "SELECT pg_terminate_backend(l.pid) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND l.pid <> pg_backend_pid()"
)


def drop_schema(schema: str) -> None:
    """Drop the schema; sessions still holding its locks (a failed test's tasks) are ended, never waited for."""
    import psycopg

    with psycopg.connect(postgres_url(), autocommit=True) as conn:
        conn.execute("SET lock_timeout = '3s'")
        for attempt in range(_DROP_TRIES):
            try:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                return
            except psycopg.errors.LockNotAvailable:
                if attempt == _DROP_TRIES - 1:
                    raise
                conn.execute(_HOLDERS, (schema,))


async def drop_schema_async(schema: str) -> None:
    """drop_schema without blocking the event loop: a test's leftover tasks may still need it to finish."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(postgres_url(), autocommit=True) as conn:
        await conn.execute("SET lock_timeout = '3s'")
        for attempt in range(_DROP_TRIES):
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                return
            except psycopg.errors.LockNotAvailable:
                if attempt == _DROP_TRIES - 1:
                    raise
                await conn.execute(_HOLDERS, (schema,))


@asynccontextmanager
async def fresh_schema() -> AsyncIterator[tuple[str, str]]:
    """(server URL, name of a schema no other test uses), the schema dropped afterwards."""
    url = require_postgres()
    schema = f"kiln_test_{uuid.uuid4().hex[:12]}"
    try:
        yield url, schema
    finally:
        await drop_schema_async(schema)
