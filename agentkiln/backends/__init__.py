"""Training backends other than AgentKiln's own learner (agentkiln.training): TRL, ...

Each backend trains on the same records our learner does (`Transition`, `PreferencePair`) and
writes a peft adapter folder the engine serves, so the rest of the loop (publish, serve, canary)
does not know which backend trained.
"""

from __future__ import annotations

from typing import Literal, get_args

Backend = Literal["kiln", "trl"]
BACKENDS: tuple[str, ...] = get_args(Backend)


def check_backend(name: str) -> None:
    """The one check of a configured backend name (offline and production training configs)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: use {' or '.join(BACKENDS)}")
