"""Which version serves a production session while a canary runs.

Sticky per session: the choice is a hash of (canary id, session id), so every replica makes the
same choice without shared state, a session never switches version mid-conversation, and a new
canary reshuffles which sessions try its candidate.
"""

from __future__ import annotations

from collections.abc import Container

import hashlib

from agentkiln.models import Canary, CanaryStatus

CANDIDATE = "candidate"
BASELINE = "baseline"


def session_bucket(canary_id: str, session_id: str) -> float:
    """A uniform number in [0, 1) fixed by the pair."""
    digest = hashlib.sha256(f"{canary_id}\x00{session_id}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def serves_candidate(canary: Canary | None, session_id: str | None) -> bool:
    """True when `session_id` is in the candidate's share of an active canary (no session: never)."""
    if canary is None or session_id is None or canary.status != CanaryStatus.active:
        return False
    return session_bucket(canary.canary_id, session_id) < canary.share


def variant(canary: Canary | None, session_id: str | None) -> str:
    return CANDIDATE if serves_candidate(canary, session_id) else BASELINE


CANDIDATE_KEY_PREFIX = "candidate:"  # ':' never appears in an agent name, so keys cannot collide


def candidate_key(agent: str | None) -> str:
    """The engine weight-set key of a canary candidate's weights for `agent` (None: its main weights)."""
    return CANDIDATE_KEY_PREFIX + (agent or "")


def weight_set_key(agent: str | None, variant: str | None, loaded: Container[str | None]) -> str | None:
    """The weight set serving `agent`'s call: for a canary's candidate share its candidate set for this
    agent, else the candidate's main set (when `loaded`); otherwise the agent's own key."""
    if variant == CANDIDATE:
        for key in (candidate_key(agent), candidate_key(None)):
            if key in loaded:
                return key
    return agent
