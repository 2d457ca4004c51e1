"""A lone LLM span costs few SQLite statements: it is the gateway's per-call write."""

from __future__ import annotations

from pathlib import Path

from agentkiln.models import SpanIn
from agentkiln.store import SqliteStore


def _span(rid: str, aid: str, span_id: str) -> SpanIn:
    return SpanIn(rollout_id=rid, attempt_id=aid, name="llm_call", span_id=span_id, start_time=0.0, end_time=1.0)


async def test_lone_span_write_statements(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    ar = await store.start_rollout("x")
    rid, aid = ar.rollout.rollout_id, ar.attempt.attempt_id
    await store.add_spans([_span(rid, aid, "s1")])  # opens the direct write connection
    conn = store._direct["write"][0]
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    spans = await store.add_spans([_span(rid, aid, "s2")])
    conn.set_trace_callback(None)
    assert [s.sequence_id for s in spans] == [2]
    # BEGIN, one SELECT (the attempt, its last sequence id, whether the span is stored), INSERT, heartbeat, COMMIT
    assert len(statements) == 5, statements
    assert not any("json_each" in s for s in statements)  # a lone span id needs no JSON list
    again = await store.add_spans([_span(rid, aid, "s2")])  # re-sent: comes back as stored
    assert [s.sequence_id for s in again] == [2]
    await store.close()
