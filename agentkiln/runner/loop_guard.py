"""Loop detection: the same request or the same action repeated, or too many LLM calls in one attempt."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from agentkiln.models import SpanIn
from agentkiln.protocol import LLMCall
from agentkiln.runner.failures import LoopDetected


def _canonical_hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class LoopGuard:
    """Watches one attempt's LLM call spans for loops.

    Loop = the same request sent `max_repeats` times in a row, or the same action
    (response content + tool calls) produced `max_repeats` times in a row, or more than
    `max_llm_calls` calls in total. Feed it spans incrementally with `observe`; it raises
    LoopDetected. Settings come from rollout.metadata keys `max_llm_calls` and
    `max_repeated_calls` (see `from_metadata`).
    """

    DEFAULT_MAX_REPEATS = 5

    def __init__(self, *, max_repeats: int | None = DEFAULT_MAX_REPEATS, max_llm_calls: int | None = None):
        self.max_repeats = max_repeats
        self.max_llm_calls = max_llm_calls
        self.calls = 0
        self._last: dict[str, tuple[str, int]] = {}
        self._last_call_id: str | None = None

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> LoopGuard:
        repeats = metadata.get("max_repeated_calls", cls.DEFAULT_MAX_REPEATS)
        max_calls = metadata.get("max_llm_calls")
        return cls(
            max_repeats=int(repeats) if repeats else None,
            max_llm_calls=int(max_calls) if max_calls else None,
        )

    def observe(self, spans: Iterable[SpanIn]) -> None:
        for span in spans:
            call = LLMCall.from_span(span)
            call_id = call.call_id
            if call_id is not None and call_id == self._last_call_id:
                continue  # another choice (n > 1) of the same call
            self._last_call_id = call_id
            self.calls += 1
            if self.max_llm_calls is not None and self.calls > self.max_llm_calls:
                raise LoopDetected(f"more than {self.max_llm_calls} LLM calls (max_llm_calls)")
            if not self.max_repeats or span.status.code == "ERROR":
                continue  # failed calls retried by the agent are LLM errors, not loops
            keys = {}
            if call.request:
                keys["request"] = _canonical_hash(call.request_key())
            if call.response is not None:
                keys["action"] = _canonical_hash(call.action())
            for what, key in keys.items():
                prev = self._last.get(what)
                count = prev[1] + 1 if prev and prev[0] == key else 1
                self._last[what] = (key, count)
                if count >= self.max_repeats:
                    raise LoopDetected(f"the same LLM {what} repeated {count} times in a row")
