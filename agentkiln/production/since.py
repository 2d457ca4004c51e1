"""`--since` values: an ISO time, a unix timestamp, or an age such as 24h (what a person types)."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str | float, now: float | None = None) -> float:
    """A unix time from `text`: "24h" / "30m" / "7d" / "90s" / "2w" (that long before `now`), a number
    (a unix timestamp), or an ISO 8601 time ("2025-01-31", "2025-01-31T12:00:00Z"; no offset: UTC).
    Raises ValueError with the accepted forms."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    raw = str(text).strip()
    age = _AGE.match(raw)
    if age:
        return (time.time() if now is None else now) - float(age[1]) * _UNIT_S[age[2].lower()]
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(raw[:-1] + "+00:00" if raw.endswith(("Z", "z")) else raw)
    except ValueError:
        raise ValueError(
            f"cannot read since={raw!r}: use an age (24h, 30m, 7d), a unix timestamp, or an ISO time"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()
