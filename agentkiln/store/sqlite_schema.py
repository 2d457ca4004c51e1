"""Schema of the SQLite store: tables, indexes, pragmas and the checks run when a file is opened.

Every statement is idempotent (IF NOT EXISTS), so opening an existing file brings it up to
date; what IF NOT EXISTS cannot do (a new key, a new column) runs once per file by `user_version`,
which also guards against files written by a newer agentkiln.
"""

from __future__ import annotations

import logging
import sqlite3

from agentkiln.store.base import StoreError
from agentkiln.store.sqlite_responses import RESPONSES_AGE_INDEX, RESPONSES_TABLE

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: learning from use (sessions, feedback, canaries; see _upgrade_to_2)

# Attempt ids are unique per rollout only: every production session's attempt is protocol.SESSION_ATTEMPT_ID.
ATTEMPTS_TABLE = """CREATE TABLE IF NOT EXISTS attempts (
        attempt_id TEXT NOT NULL,
        rollout_id TEXT NOT NULL,
        sequence_id INTEGER NOT NULL,
        worker_id TEXT,
        status TEXT NOT NULL,
        start_time REAL NOT NULL,
        end_time REAL,
        last_heartbeat REAL NOT NULL,
        error TEXT,  -- JSON
        PRIMARY KEY (rollout_id, attempt_id),
        UNIQUE (rollout_id, sequence_id)
    )"""
ATTEMPTS_RUNNING_INDEX = "CREATE INDEX IF NOT EXISTS attempts_running ON attempts(rollout_id) WHERE status = 'running'"

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
    ATTEMPTS_TABLE,
    ATTEMPTS_RUNNING_INDEX,
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
        metadata TEXT NOT NULL,  -- JSON
        candidate INTEGER NOT NULL DEFAULT 0  -- 1: only a canary serves it (get_latest_resources skips it)
    )""",
    """CREATE TABLE IF NOT EXISTS workers (
        worker_id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        last_heartbeat REAL NOT NULL,
        current_rollout_id TEXT,
        current_attempt_id TEXT,
        metadata TEXT NOT NULL  -- JSON
    )""",
    # The response-id index: the span of each recorded LLM call, by its kiln.llm.call_id (feedback targets).
    """CREATE TABLE IF NOT EXISTS llm_calls (
        id INTEGER PRIMARY KEY,
        call_id TEXT NOT NULL,
        rollout_id TEXT NOT NULL,
        attempt_id TEXT NOT NULL,
        span_id TEXT NOT NULL,
        choice_index INTEGER NOT NULL,
        model_version TEXT,
        UNIQUE (call_id, rollout_id, attempt_id, span_id)
    )""",
    "CREATE INDEX IF NOT EXISTS llm_calls_by_rollout ON llm_calls(rollout_id)",
    """CREATE TABLE IF NOT EXISTS feedback (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order
        feedback_id TEXT NOT NULL UNIQUE,
        client_id TEXT UNIQUE,  -- a retried post finds the first by it
        rollout_id TEXT NOT NULL,  -- resolved target
        response_id TEXT,
        created_at REAL NOT NULL,
        data TEXT NOT NULL  -- JSON: the Feedback record
    )""",
    "CREATE INDEX IF NOT EXISTS feedback_by_rollout ON feedback(rollout_id, seq)",
    "CREATE INDEX IF NOT EXISTS feedback_by_response ON feedback(response_id, seq) WHERE response_id IS NOT NULL",
    """CREATE TABLE IF NOT EXISTS canaries (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- creation order
        canary_id TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL,
        data TEXT NOT NULL  -- JSON: the Canary record
    )""",
    # One active canary at a time, whichever process starts it.
    "CREATE UNIQUE INDEX IF NOT EXISTS canaries_one_active ON canaries(status) WHERE status = 'active'",
    # Responses API state (sqlite_responses): a new table, so no version bump (older code ignores it).
    RESPONSES_TABLE,
    RESPONSES_AGE_INDEX,
]

_A_COPY = "attempt_id, rollout_id, sequence_id, worker_id, status, start_time, end_time, last_heartbeat, error"
_JSON_ATTR = "json_extract(attributes, '$.\"{}\"')"
_CALL_BACKFILL = (
    "INSERT OR IGNORE INTO llm_calls (call_id, rollout_id, attempt_id, span_id, choice_index, model_version) "
    f"SELECT {_JSON_ATTR.format('kiln.llm.call_id')}, rollout_id, attempt_id, span_id, "
    f"CASE WHEN json_type(attributes, '$.\"kiln.llm.choice_index\"') = 'integer' "
    f"THEN {_JSON_ATTR.format('kiln.llm.choice_index')} ELSE 0 END, "
    f"CAST({_JSON_ATTR.format('kiln.model.version')} AS TEXT) "
    "FROM spans WHERE name = 'kiln.llm.call' AND json_type(attributes, '$.\"kiln.llm.call_id\"') = 'text' "
    f"AND {_JSON_ATTR.format('kiln.llm.call_id')} != '' ORDER BY id"
)


def _upgrade_to_2(conn: sqlite3.Connection, path: str) -> None:
    """Files of version 1: attempts re-keyed by (rollout_id, attempt_id), resources.candidate added,
    the response-id index filled from the LLM-call spans already stored (the new tables exist by now)."""
    pk = {row[1]: row[5] for row in conn.execute("PRAGMA table_info(attempts)")}
    if pk.get("attempt_id") == 1 and pk.get("rollout_id") == 0:  # the version-1 key: attempt_id alone
        log.info("%s: re-keying attempts by (rollout_id, attempt_id)", path)
        conn.execute("ALTER TABLE attempts RENAME TO attempts_v1")  # its index goes with it
        conn.execute(ATTEMPTS_TABLE)
        conn.execute(f"INSERT INTO attempts ({_A_COPY}) SELECT {_A_COPY} FROM attempts_v1")
        conn.execute("DROP TABLE attempts_v1")
        conn.execute(ATTEMPTS_RUNNING_INDEX)
    if "candidate" not in {row[1] for row in conn.execute("PRAGMA table_info(resources)")}:
        conn.execute("ALTER TABLE resources ADD COLUMN candidate INTEGER NOT NULL DEFAULT 0")
    conn.execute(_CALL_BACKFILL)


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
        if version < 2:
            _upgrade_to_2(conn, path)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        conn.close()
        raise
    return conn
