"""Store backends: the shared state of trainer and runners (see base.Store for the contract)."""

from __future__ import annotations

from agentkiln.store.base import InvalidTransitionError, NotFoundError, Store, StoreError, ValidationError
from agentkiln.store.memory import InMemoryStore
from agentkiln.store.sqlite import SqliteStore

__all__ = [
    "InMemoryStore",
    "InvalidTransitionError",
    "NotFoundError",
    "SqliteStore",
    "Store",
    "StoreError",
    "ValidationError",
    "open_store",
]


def open_store(url: str) -> Store:
    """Store from a URL: "memory", "sqlite:///rel.db" / "sqlite:////abs.db", a path ending .db,
    "postgresql://user@host:port/db[?schema=name]" (also postgres://; the `postgres` extra), or "http(s)://...".

    sqlite URLs follow the SQLAlchemy convention: three slashes then the path, so an
    absolute path shows four slashes.
    """
    if url in ("memory", "memory://", ":memory:"):
        return InMemoryStore()
    if url.startswith("sqlite:///"):
        return SqliteStore(url[len("sqlite:///") :])
    if url.startswith(("postgresql://", "postgres://")):  # optional dependency: imported only when asked for
        from agentkiln.store.postgres import PostgresStore

        return PostgresStore(url)
    if url.startswith(("http://", "https://")):
        from agentkiln.store.client import HttpStore

        return HttpStore(url)
    if url.endswith((".db", ".sqlite", ".sqlite3")):
        return SqliteStore(url)
    raise ValueError(
        f"unknown store url {url!r}: use 'memory', 'sqlite:///path.db', a .db path, "
        "postgresql://user@host/db or http(s)://host:port"
    )
