"""Stored Responses API conversations survive `kill -9` of `kiln serve`: they live in the store (issue 19).

The real openai SDK against a real server process (tiny engine, SQLite file): a stored response is
created, the server is killed, a new server on the same file continues the conversation by
`previous_response_id`, and the prompt it sends the engine holds the earlier turn (read back from
the call's span). Replicas on one PostgreSQL database: tests/test_replicas.py.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import openai

from agentkiln.protocol import SpanAttrs, SpanNames, attempt_base_url
from agentkiln.store.client import HttpStore
from tests.serve_process import ServeProcess


def _server(db: Path, log: Path) -> ServeProcess:
    env = {**os.environ, "KILN_API_KEY": "", "HF_HUB_OFFLINE": "1"}
    server = ServeProcess(["--engine", "tiny", "--store", str(db)], env, log)
    server.wait_ready()
    return server


async def test_a_stored_conversation_continues_after_kill9(tmp_path: Path) -> None:
    db, log = tmp_path / "kiln.db", tmp_path / "server.log"
    first = _server(db, log)
    try:
        async with HttpStore(first.url, retries=0) as store:
            ar = await store.start_rollout({"task": "chat"})  # recorded, so the prompts read back from spans
        rid, aid = ar.rollout.rollout_id, ar.attempt.attempt_id
        c1 = openai.OpenAI(base_url=attempt_base_url(first.url, rid, aid), api_key="k", max_retries=0)
        r1 = c1.responses.create(model="tiny", input="The first question", max_output_tokens=6)
        assert r1.store is True
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
    finally:
        first.stop()

    second = _server(db, log)
    try:
        c2 = openai.OpenAI(base_url=attempt_base_url(second.url, rid, aid), api_key="k", max_retries=0)
        got = c2.responses.retrieve(r1.id)
        assert got.id == r1.id and got.output_text == r1.output_text
        assert [it.type for it in c2.responses.input_items.list(r1.id).data] == ["message"]
        r2 = c2.responses.create(
            model="tiny", input="The second question", previous_response_id=r1.id, max_output_tokens=6
        )
        assert r2.previous_response_id == r1.id
        async with HttpStore(second.url, retries=0) as store:
            spans = await store.query_spans(rid, name=SpanNames.llm_call)
        [call] = [s for s in spans if s.attributes[SpanAttrs.call_id] == r2.id]
        messages = call.attributes[SpanAttrs.request]["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "user"]
        assert [m["content"] for m in messages] == ["The first question", r1.output_text, "The second question"]
    finally:
        second.stop()
