"""Schema of the SQLite store: tables, indexes, pragmas and the checks run when a file is opened.

Every statement is idempotent (IF NOT EXISTS), so opening an existing file brings it up to
date; `user_version` guards against files written by a newer agentkiln.
"""

from __future__ import annotations

import logging
import sqlite3

from agentkiln.store.base import StoreError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS rollouts (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- creation order, drives FIFO
        rollout_id TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL,
        mode TEXT,
        input TEXT NOT NULL,  -- JSON
        resources_id TEXT,
        config TEXT NOT NULL,  -- JSON
        metadata TEXT NOT NULL,  -- JSON
        created_at REAL NOT NULL,
        start_time REAL,
        end_time REAL,
        num_attempts INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX IF NOT EXISTS rollouts_waiting ON rollouts(seq) WHERE status IN ('queuing', 'requeuing')",
    "CREATE INDEX IF NOT EXISTS rollouts_status ON rollouts(status, seq)",
    """CREATE TABLE IF NOT EXISTS attempts (
        attempt_id TEXT PRIMARY KEY,
        rollout_id TEXT NOT NULL,
        sequence_id INTEGER NOT NULL,
        worker_id TEXT,
        status TEXT NOT NULL,
        start_time REAL NOT NULL,
        end_time REAL,
        last_heartbeat REAL NOT NULL,
        error TEXT,  -- JSON
        UNIQUE (rollout_id, sequence_id)
    )""",
    "CREATE INDEX IF NOT EXISTS attempts_running ON attempts(rollout_id) WHERE status = 'running'",
    """CREATE TABLE IF NOT EXISTS spans (
        id INTEGER PRIMARY KEY,
        rollout_id TEXT NOT NULL,
        attempt_id TEXT NOT NULL,
        attempt_seq INTEGER NOT NULL,
        sequence_id INTEGER NOT NULL,
        name TEXT NOT NULL,
        trace_id TEXT NOT NULL,
        span_id TEXT NOT NULL,
        parent_id TEXT,
        start_time REAL NOT NULL,
        end_time REAL,
        attributes TEXT NOT NULL,  -- JSON
        events TEXT NOT NULL,  -- JSON
        status TEXT NOT NULL,  -- JSON
        resource TEXT NOT NULL  -- JSON
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS spans_by_attempt ON spans(rollout_id, attempt_id, sequence_id)",
    "CREATE INDEX IF NOT EXISTS spans_by_rollout ON spans(rollout_id, attempt_seq, sequence_id)",
    """CREATE TABLE IF NOT EXISTS resources (
        resources_id TEXT PRIMARY KEY,
        version INTEGER NOT NULL UNIQUE,
        created_at REAL NOT NULL,
        llms TEXT NOT NULL,  -- JSON
        prompts TEXT NOT NULL,  -- JSON
        metadata TEXT NOT NULL  -- JSON
    )""",
    """CREATE TABLE IF NOT EXISTS workers (
        worker_id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        last_heartbeat REAL NOT NULL,
        current_rollout_id TEXT,
        current_attempt_id TEXT,
        metadata TEXT NOT NULL  -- JSON
    )""",
]

# A span's identity: a re-sent span is found (and not stored again) by this key.
SPAN_KEY_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS spans_by_key ON spans(rollout_id, attempt_id, span_id)"


def _ensure_span_key_index(conn: sqlite3.Connection, path: str) -> None:
    """Add the span key index; a file whose spans already repeat a key keeps working without it.

    Such files could only come from versions that stored re-sent spans twice. add_spans looks
    spans up before inserting either way, so only speed is lost (the lookup scans the attempt).
    """
    conn.execute("SAVEPOINT span_key")
    try:
        conn.execute(SPAN_KEY_INDEX)
    except sqlite3.IntegrityError as exc:
        conn.execute("ROLLBACK TO span_key")
        log.warning("%s: spans repeat a (rollout_id, attempt_id, span_id), keeping them without a unique index: %s",
                    path, exc)  # fmt: skip
    finally:
        conn.execute("RELEASE span_key")


def open_connection(path: str) -> sqlite3.Connection:
    """Connect (autocommit; transactions are explicit), set WAL pragmas, create or update the schema."""
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("BEGIN IMMEDIATE")
    try:
        for stmt in SCHEMA:
            conn.execute(stmt)
        _ensure_span_key_index(conn, path)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{path} has schema version {version}, newer than this agentkiln")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        conn.close()
        raise
    return conn
