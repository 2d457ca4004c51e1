"""Column lists and value placeholders of the PostgreSQL store; rows convert through `sqlite_rows`.

JSON columns are selected as text (`::text`) and written from JSON text (`::json` / `::jsonb`),
so both backends share one row layout and one conversion, and a value reads back exactly as
the SQLite store returns it. Columns whose dicts carry meaning in their key order (a rollout's
input, span attributes, the order of a resources' llms, which picks the default endpoint) are
`json`, which keeps the text as written; fixed-shape records (config, error, span status) are
`jsonb`, which normalises key order.
"""

from __future__ import annotations

from agentkiln.store.sqlite_rows import (
    attempt_from_row,
    attempt_values,
    dumps,
    resources_from_row,
    rollout_from_row,
    rollout_values,
    span_from_row,
    span_values,
    worker_from_row,
)

__all__ = [
    "A_INSERT",
    "A_SELECT",
    "A_SELECT_A",
    "RES_INSERT",
    "RES_SELECT",
    "R_INSERT",
    "R_SELECT",
    "R_SELECT_R",
    "S_INSERT",
    "S_SELECT",
    "W_SELECT",
    "W_UPSERT",
    "attempt_from_row",
    "attempt_values",
    "dumps",
    "resources_from_row",
    "rollout_from_row",
    "rollout_values",
    "span_from_row",
    "span_values",
    "worker_from_row",
]


def _select(cols: str, json_cols: set[str], prefix: str = "") -> str:
    return ", ".join(f"{prefix}{c}::text" if c in json_cols else f"{prefix}{c}" for c in cols.split(", "))


_R = "rollout_id, status, mode, input, resources_id, config, metadata, created_at, start_time, end_time, num_attempts"
R_SELECT = _select(_R, {"input", "config", "metadata"})
R_SELECT_R = _select(_R, {"input", "config", "metadata"}, "r.")  # for joins that name the rollouts table `r`
R_INSERT = f"INSERT INTO rollouts ({_R}) VALUES (%s, %s, %s, %s::json, %s, %s::jsonb, %s::json, %s, %s, %s, %s)"

_A = "attempt_id, rollout_id, sequence_id, worker_id, status, start_time, end_time, last_heartbeat, error"
A_SELECT = _select(_A, {"error"})
A_SELECT_A = _select(_A, {"error"}, "a.")  # for joins that name the attempts table `a`
A_INSERT = f"INSERT INTO attempts ({_A}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb)"

_S = (
    "rollout_id, attempt_id, sequence_id, name, trace_id, span_id, parent_id, start_time, end_time, "
    "attributes, events, status, resource"
)
S_SELECT = _select(_S, {"attributes", "events", "status", "resource"})
_S_INSERT_COLS = (
    "rollout_id, attempt_id, attempt_seq, sequence_id, name, trace_id, span_id, parent_id, start_time, end_time, "
    "attributes, events, status, resource"
)
S_INSERT = (
    f"INSERT INTO spans ({_S_INSERT_COLS}) VALUES "
    "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::json, %s::json, %s::jsonb, %s::json)"
)

_RES = "resources_id, version, created_at, llms, prompts, metadata, candidate"
RES_SELECT = _select(_RES, {"llms", "prompts", "metadata"})
RES_INSERT = f"INSERT INTO resources ({_RES}) VALUES (%s, %s, %s, %s::json, %s::json, %s::json, %s)"

_W = "worker_id, status, last_heartbeat, current_rollout_id, current_attempt_id, metadata"
W_SELECT = _select(_W, {"metadata"})
W_UPSERT = (
    f"INSERT INTO workers ({_W}) VALUES (%s, %s, %s, %s, %s, %s::json) ON CONFLICT (worker_id) DO UPDATE SET "
    "status = EXCLUDED.status, last_heartbeat = EXCLUDED.last_heartbeat, "
    "current_rollout_id = EXCLUDED.current_rollout_id, current_attempt_id = EXCLUDED.current_attempt_id, "
    "metadata = EXCLUDED.metadata"
)
