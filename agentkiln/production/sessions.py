"""Which session a plain /v1 call belongs to.

In order: the `X-Kiln-Session` header, `metadata.session_id` of the request, the session of the
call this one continues (its message history holds an earlier call's messages plus that call's
answer: the way every chat client resends a conversation, and the Responses API's
`previous_response_id` expands to), the OpenAI `user` field, else a new session.

The continuation index lives in this process (bounded LRU): behind several replicas, sticky
routing or an explicit session header keeps a conversation in one session; without them a
continued conversation may start a new session on another replica (each stays consistent).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections import OrderedDict
from typing import Any, Mapping, Optional

from agentkiln.engine.base import ChatResult
from agentkiln.engine.chat.messages import content_text
from agentkiln.models import SESSION_ID_PATTERN
from agentkiln.protocol import Headers

_SESSION_RE = re.compile(SESSION_ID_PATTERN)


class SessionIdError(ValueError):
    """A client named a session id the store cannot key (the gateway answers 400)."""


def _arguments(arguments: Any) -> str:
    """Tool-call arguments in one spelling (clients re-serialise the JSON they got)."""
    if isinstance(arguments, str):
        try:
            return json.dumps(json.loads(arguments), sort_keys=True, separators=(",", ":"))
        except ValueError:
            return arguments
    return json.dumps(arguments, sort_keys=True, separators=(",", ":"), default=str)


def _canonical(message: Mapping[str, Any]) -> list[Any]:
    """What two spellings of one message share: role, text, tool calls (name, arguments)."""
    calls = []
    for call in message.get("tool_calls") or []:
        if isinstance(call, dict):
            fn = call.get("function") or call
            calls.append([str(fn.get("name")), _arguments(fn.get("arguments"))])
    return [str(message.get("role")), content_text(message.get("content")), calls]


class _Digest:
    """A running hash over canonical messages: prefix digests of one history in one pass."""

    def __init__(self) -> None:
        self._h = hashlib.blake2b(digest_size=16)

    def add(self, message: Mapping[str, Any]) -> str:
        self._h.update(json.dumps(_canonical(message), separators=(",", ":"), ensure_ascii=False).encode())
        self._h.update(b"\x1e")
        return self._h.copy().hexdigest()


def reply_message(result: ChatResult) -> dict[str, Any]:
    """The assistant message a client will resend for this answer (first choice)."""
    choice = result.choices[0]
    message: dict[str, Any] = {"role": "assistant", "content": choice.text}
    if choice.tool_calls:
        message["tool_calls"] = [
            {"type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in choice.tool_calls
        ]
    return message


class SessionResolver:
    """Names the session of each call and remembers answers so continuations find their session."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._continues: OrderedDict[str, str] = OrderedDict()  # digest of history + answer -> session

    def resolve(
        self,
        headers: Mapping[str, str],
        metadata: Optional[Mapping[str, Any]],
        user: Optional[str],
        messages: list[dict[str, Any]],
    ) -> tuple[str, str]:
        """(session id, how it was found: header / metadata / continued / user / new)."""
        named = headers.get(Headers.session)
        if named is None and metadata and isinstance(metadata.get("session_id"), str):
            named, source = metadata["session_id"], "metadata"
        else:
            source = "header"
        if named is not None:
            if not _SESSION_RE.match(named):
                raise SessionIdError("session ids are 1-256 characters of A-Z a-z 0-9 _ . : @ -")
            return named, source
        found = self._continued(messages)
        if found is not None:
            return found, "continued"
        if user and _SESSION_RE.match(f"user:{user}"):
            return f"user:{user}", "user"
        return f"auto:{uuid.uuid4().hex}", "new"

    def _continued(self, messages: list[dict[str, Any]]) -> Optional[str]:
        """The session whose remembered answer is the latest assistant turn of `messages`."""
        digest = _Digest()
        prefixes = [(digest.add(m), m.get("role")) for m in messages]
        for key, role in reversed(prefixes):
            if role == "assistant":
                session = self._continues.get(key)
                if session is not None:
                    self._continues.move_to_end(key)
                    return session
        return None

    def remember(self, session_id: str, messages: list[dict[str, Any]], result: ChatResult) -> None:
        """After an answer: the history a client sends next starts with messages + this answer."""
        if not result.choices:
            return
        digest = _Digest()
        for m in messages:
            digest.add(m)
        key = digest.add(reply_message(result))
        self._continues[key] = session_id
        self._continues.move_to_end(key)
        while len(self._continues) > self.max_entries:
            self._continues.popitem(last=False)
