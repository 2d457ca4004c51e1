"""PostgreSQL store backend (`postgresql://...` URLs); needs the `postgres` extra (psycopg 3, psycopg-pool)."""

from __future__ import annotations

from agentkiln.store.postgres.schema import SCHEMA_VERSION
from agentkiln.store.postgres.store import PostgresStore

__all__ = ["SCHEMA_VERSION", "PostgresStore"]
