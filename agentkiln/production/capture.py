"""Production capture: plain /v1 calls of deployed agents recorded on their sessions.

A call that names no attempt is, when the server captures (`kiln serve --capture`), recorded on
its session's rollout (mode production; `Store.open_session`), with everything a training call
has: token ids, logprobs, the agent, the version that served it. What is captured is the
server's choice: a share of sessions (`sample_rate`, decided per session so sessions stay
whole), never a call sent with `X-Kiln-Capture: off`, and only after redaction.
Retention: sessions idle past `retention_days` are purged by the server's background task.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from agentkiln.models import AttemptedRollout
from agentkiln.production.assignment import session_bucket
from agentkiln.production.redaction import Redactor
from agentkiln.production.sessions import SessionResolver
from agentkiln.protocol import Headers
from agentkiln.store.base import Store

log = logging.getLogger(__name__)

OPT_OUT_VALUES = ("off", "0", "false", "no")
_SAMPLING_SALT = "kiln-capture"


@dataclass
class CaptureConfig:
    """Server settings of production capture (`kiln serve --capture ...`)."""

    enabled: bool = False
    sample_rate: float = 1.0  # share of sessions recorded
    retention_days: Optional[float] = None  # None: keep forever
    redact: tuple[str, ...] = ()  # built-in pattern names or re:<regex> (production/redaction.py)
    redact_hook: Optional[str] = None  # module:function, str -> str
    purge_interval_s: float = 3600.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate is a share of sessions in [0, 1], got {self.sample_rate}")
        if self.retention_days is not None and self.retention_days <= 0:
            raise ValueError(f"retention_days must be positive, got {self.retention_days}")


@dataclass
class ProductionCapture:
    config: CaptureConfig = field(default_factory=CaptureConfig)
    resolver: SessionResolver = field(default_factory=SessionResolver)
    max_open_sessions: int = 100_000

    def __post_init__(self) -> None:
        self.redactor: Optional[Redactor] = Redactor.build(self.config.redact, self.config.redact_hook)
        self._opened: OrderedDict[str, None] = OrderedDict()  # sessions known to exist in the store
        self._opening: dict[str, asyncio.Future[AttemptedRollout]] = {}

    def sampled(self, session_id: str) -> bool:
        rate = self.config.sample_rate
        return rate >= 1.0 or (rate > 0.0 and session_bucket(_SAMPLING_SALT, session_id) < rate)

    def opted_out(self, headers: Mapping[str, str]) -> bool:
        return (headers.get(Headers.capture) or "").strip().lower() in OPT_OUT_VALUES

    def session_of(
        self, headers: Mapping[str, str], metadata: Optional[Mapping[str, Any]], user: Optional[str], messages: list
    ) -> str:
        return self.resolver.resolve(headers, metadata, user, messages)[0]

    async def records(self, store: Store, session_id: str, headers: Mapping[str, str]) -> bool:
        """Whether this call is recorded; its session's rollout is opened in the store on its first
        recorded call (one write per session)."""
        if not self.config.enabled or self.opted_out(headers) or not self.sampled(session_id):
            return False
        if session_id not in self._opened:
            await self._open(store, session_id)
        return True

    async def _open(self, store: Store, session_id: str) -> None:
        pending = self._opening.get(session_id)
        if pending is None:  # concurrent first calls of one session share one store write
            pending = asyncio.ensure_future(store.open_session(session_id))
            self._opening[session_id] = pending
            pending.add_done_callback(lambda _f: self._opening.pop(session_id, None))
        await asyncio.shield(pending)
        self._opened[session_id] = None
        self._opened.move_to_end(session_id)
        while len(self._opened) > self.max_open_sessions:
            self._opened.popitem(last=False)

    def forget(self) -> None:
        """After a purge: sessions must be opened again before their next call is recorded."""
        self._opened.clear()


async def purge_forever(store: Store, capture: ProductionCapture) -> None:
    """The retention task: every purge_interval_s, drop sessions idle past retention_days."""
    import time

    days = capture.config.retention_days
    if days is None:
        return
    while True:
        try:
            purged = await store.purge_production(time.time() - days * 86_400)
            # Every pass, not only one that purged here: a replica on the same database may have
            # purged sessions this server still remembers as open (re-opening is one idempotent write).
            capture.forget()
            if purged:
                log.info("retention: purged %d production session(s) idle over %s days", purged, days)
        except Exception:
            log.exception("retention purge failed")
        await asyncio.sleep(capture.config.purge_interval_s)
