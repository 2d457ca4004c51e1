"""Versioned schema of the PostgreSQL store, applied when a store opens.

Migrations run in one transaction behind a transaction-level advisory lock, so servers starting
together on one database apply each version exactly once (the others wait, then find it done).
`kiln_schema_version` records the versions applied; a database already at a newer version than
this code knows is refused rather than used with the wrong layout.
"""

from __future__ import annotations

import logging

from psycopg import AsyncConnection, sql

from agentkiln.models import now as wall_now
from agentkiln.store.base import StoreError

log = logging.getLogger(__name__)

# Advisory lock classes (first key); the second key is hashtext(current_schema()), so stores in
# different schemas of one database never wait for each other.
LOCK_MIGRATE = 0x6B696C6E  # "kiln"
LOCK_SWEEP = LOCK_MIGRATE + 1
LOCK_RESOURCES = LOCK_MIGRATE + 2

# Version -> statements. Append new versions; never edit an applied one.
MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE rollouts (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- creation order, drives FIFO
            rollout_id TEXT NOT NULL UNIQUE,
            status TEXT NOT NULL,
            mode TEXT,
            input JSON NOT NULL,
            resources_id TEXT,
            config JSONB NOT NULL,
            metadata JSON NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            start_time DOUBLE PRECISION,
            end_time DOUBLE PRECISION,
            num_attempts INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX rollouts_waiting ON rollouts (seq) WHERE status IN ('queuing', 'requeuing')",
        "CREATE INDEX rollouts_status ON rollouts (status, seq)",
        """CREATE TABLE attempts (
            attempt_id TEXT PRIMARY KEY,
            rollout_id TEXT NOT NULL,
            sequence_id INTEGER NOT NULL,
            worker_id TEXT,
            status TEXT NOT NULL,
            start_time DOUBLE PRECISION NOT NULL,
            end_time DOUBLE PRECISION,
            last_heartbeat DOUBLE PRECISION NOT NULL,
            error JSONB,
            UNIQUE (rollout_id, sequence_id)
        )""",
        "CREATE INDEX attempts_running ON attempts (rollout_id) WHERE status = 'running'",
        """CREATE TABLE spans (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            rollout_id TEXT NOT NULL,
            attempt_id TEXT NOT NULL,
            attempt_seq INTEGER NOT NULL,
            sequence_id INTEGER NOT NULL,
            name TEXT NOT NULL,
            trace_id TEXT NOT NULL,
            span_id TEXT NOT NULL,
            parent_id TEXT,
            start_time DOUBLE PRECISION NOT NULL,
            end_time DOUBLE PRECISION,
            attributes JSON NOT NULL,
            events JSON NOT NULL,
            status JSONB NOT NULL,
            resource JSON NOT NULL
        )""",
        "CREATE UNIQUE INDEX spans_by_attempt ON spans (rollout_id, attempt_id, sequence_id)",
        "CREATE UNIQUE INDEX spans_by_key ON spans (rollout_id, attempt_id, span_id)",
        "CREATE INDEX spans_by_rollout ON spans (rollout_id, attempt_seq, sequence_id)",
        """CREATE TABLE resources (
            resources_id TEXT PRIMARY KEY,
            version INTEGER NOT NULL UNIQUE,
            created_at DOUBLE PRECISION NOT NULL,
            llms JSON NOT NULL,
            prompts JSON NOT NULL,
            metadata JSON NOT NULL
        )""",
        """CREATE TABLE workers (
            seq BIGINT GENERATED ALWAYS AS IDENTITY,  -- first-seen order, as query_workers lists them
            worker_id TEXT PRIMARY KEY,
            status TEXT NOT NULL,
            last_heartbeat DOUBLE PRECISION NOT NULL,
            current_rollout_id TEXT,
            current_attempt_id TEXT,
            metadata JSON NOT NULL
        )""",
    ],
    # Learning from use: attempt ids unique per rollout only (every session's attempt is "live"),
    # candidate resources, the response-id index (filled from the LLM-call spans already stored),
    # feedback and canaries (one active at a time, whichever replica starts it).
    2: [
        "ALTER TABLE attempts DROP CONSTRAINT attempts_pkey",
        "ALTER TABLE attempts ADD PRIMARY KEY (rollout_id, attempt_id)",
        "ALTER TABLE resources ADD COLUMN candidate BOOLEAN NOT NULL DEFAULT FALSE",
        """CREATE TABLE llm_calls (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            call_id TEXT NOT NULL,
            rollout_id TEXT NOT NULL,
            attempt_id TEXT NOT NULL,
            span_id TEXT NOT NULL,
            choice_index INTEGER NOT NULL,
            model_version TEXT,
            UNIQUE (call_id, rollout_id, attempt_id, span_id)
        )""",
        "CREATE INDEX llm_calls_by_rollout ON llm_calls (rollout_id)",
        """INSERT INTO llm_calls (call_id, rollout_id, attempt_id, span_id, choice_index, model_version)
            SELECT attributes->>'kiln.llm.call_id', rollout_id, attempt_id, span_id,
                CASE WHEN json_typeof(attributes->'kiln.llm.choice_index') = 'number'
                    AND (attributes->>'kiln.llm.choice_index') ~ '^[0-9]{1,9}$'
                    THEN (attributes->>'kiln.llm.choice_index')::integer ELSE 0 END,
                attributes->>'kiln.model.version'
            FROM spans WHERE name = 'kiln.llm.call' AND json_typeof(attributes->'kiln.llm.call_id') = 'string'
                AND attributes->>'kiln.llm.call_id' <> '' ORDER BY id
            ON CONFLICT DO NOTHING""",
        """CREATE TABLE feedback (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- arrival order
            feedback_id TEXT NOT NULL UNIQUE,
            client_id TEXT UNIQUE,  -- a retried post finds the first by it
            rollout_id TEXT NOT NULL,
            response_id TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            data JSON NOT NULL
        )""",
        "CREATE INDEX feedback_by_rollout ON feedback (rollout_id, seq)",
        "CREATE INDEX feedback_by_response ON feedback (response_id, seq) WHERE response_id IS NOT NULL",
        """CREATE TABLE canaries (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            canary_id TEXT NOT NULL UNIQUE,
            status TEXT NOT NULL,
            data JSON NOT NULL
        )""",
        "CREATE UNIQUE INDEX canaries_one_active ON canaries (status) WHERE status = 'active'",
    ],
    # Replicas share the answers to keyed writes (Idempotency-Key; store/postgres/idempotency.py).
    3: [
        """CREATE TABLE idempotency_answers (
            key_hash BYTEA PRIMARY KEY,  -- sha256 of (method, path, key): paths and keys may be long
            owner TEXT NOT NULL,  -- the server process whose claim this is
            expires_at DOUBLE PRECISION NOT NULL,  -- the database's clock; the row is void after it
            lease_until DOUBLE PRECISION,  -- while the write runs: its claim lapses after this
            status INTEGER,  -- NULL until answered
            headers JSON,
            body BYTEA
        )""",
        "CREATE INDEX idempotency_answers_expiry ON idempotency_answers (expires_at)",
    ],
    # Responses API state (store/postgres/responses.py): a `previous_response_id` reaches any replica.
    4: [
        """CREATE TABLE responses (
            response_id TEXT PRIMARY KEY,
            created_at DOUBLE PRECISION NOT NULL,
            size BIGINT NOT NULL,  -- what the byte bound counts
            data JSON NOT NULL  -- the StoredResponse record
        )""",
        "CREATE INDEX responses_by_age ON responses (created_at, response_id)",
    ],
}
SCHEMA_VERSION = max(MIGRATIONS)


async def migrate(conn: AsyncConnection, schema: str | None, migrations: dict[int, list[str]] = MIGRATIONS) -> int:
    """Bring the schema up to date in one transaction; returns how many versions were applied."""
    latest = max(migrations)
    async with conn.transaction():
        if schema is not None:
            # Creating a schema races like a table would: serialise on the database-wide lock first.
            await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_MIGRATE, schema))
            await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        current = (await (await conn.execute("SELECT current_schema()")).fetchone())[0]
        if current is None:
            raise StoreError("no schema to create the store in: the search_path names none that exists")
        await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(current_schema()))", (LOCK_MIGRATE,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS kiln_schema_version "
            "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
        )
        row = await (await conn.execute("SELECT COALESCE(MAX(version), 0) FROM kiln_schema_version")).fetchone()
        have = row[0]
        if have > latest:
            raise StoreError(
                f"PostgreSQL schema {current!r} is at store schema version {have}, newer than this agentkiln "
                f"(knows up to {latest}); upgrade agentkiln or use another schema"
            )
        applied = 0
        for version in range(have + 1, latest + 1):
            log.info("applying store schema version %d to PostgreSQL schema %r", version, current)
            for stmt in migrations[version]:
                await conn.execute(stmt)
            await conn.execute(
                "INSERT INTO kiln_schema_version (version, applied_at) VALUES (%s, %s)", (version, wall_now())
            )
            applied += 1
    return applied
