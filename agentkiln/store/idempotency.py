"""Where a server keeps the answers it replays to retried writes (the `Idempotency-Key` header).

One server alone keeps them in its own memory (server/idempotency.py). Replicas behind a load
balancer must share them: a retry that lands on another replica than the first try must find
the first answer there, or the write runs twice. A store that several servers share offers a
cache in its database (`Store.idempotency_cache`); the middleware speaks only this protocol.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import NamedTuple, Protocol


class IdempotencyKey(NamedTuple):
    """One keyed write: the same key on another route or method is another write."""

    method: str
    path: str
    key: bytes

    def digest(self) -> bytes:
        """A fixed-size name for the key (paths and header values may be long)."""
        h = hashlib.sha256()
        for part in (self.method.encode(), self.path.encode("utf-8", "surrogateescape"), self.key):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
        return h.digest()

    def nbytes(self) -> int:
        return len(self.method) + len(self.path) + len(self.key)


@dataclass(frozen=True)
class StoredAnswer:
    """A complete HTTP answer as the first try sent it."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def nbytes(self) -> int:
        return len(self.body) + sum(len(k) + len(v) for k, v in self.headers)


class IdempotencyBusy(Exception):
    """The first try still runs elsewhere after the bounded wait; the retry should come back later."""


class IdempotencyCache(Protocol):
    """Exactly one caller runs a keyed write; the others get its answer.

    `begin` returns the answer to replay, or None: the caller now holds the key, runs the write
    and must call `finish` (with the answer to remember, or None to let a retry run again).
    A caller that arrives while another holds the key waits for its answer; a shared cache
    bounds that wait and raises IdempotencyBusy past it.
    """

    async def begin(self, key: IdempotencyKey) -> StoredAnswer | None: ...

    async def finish(self, key: IdempotencyKey, answer: StoredAnswer | None) -> None: ...
