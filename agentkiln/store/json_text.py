"""Compact JSON text identical to `json.dumps(value, separators=(",", ":"))`, mostly at orjson speed.

The store writes a span's attributes, events, status and resource as JSON text on every recorded
LLM call; stdlib json cost ~50 us for a typical span's attributes, orjson ~4 us. orjson output
differs from stdlib json in a few places, so its text is used only when it is provably the same:
- NaN / Infinity (orjson writes null), UUID, plain Enum: the text read back is not equal to the
  value (checked with one orjson.loads and a C-level comparison);
- non-str dict keys, ints beyond 64 bits, subclasses of str/int/dict/list, datetimes,
  dataclasses, cycles, very deep nesting: orjson raises;
- non-ASCII and DEL (stdlib json escapes them as \\uXXXX);
- floats below 1e-4 (orjson writes 0.00001 and 1e-6 where json writes 1e-05 and 1e-06).
Anything in doubt goes to stdlib json, so every caller sees exactly the old text and errors.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

_OPTIONS = orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
# A number token (after ':', '[', ',' or at the start) of a float below 1e-4, in either of orjson's forms.
_SMALL_FLOAT = re.compile(rb"(?:^|[:,\[])-?(?:0\.0000|\d(?:\.\d+)?e-\d(?!\d))")


def dumps(value: Any) -> str:
    """`json.dumps(value, separators=(",", ":"))`, same text and same exceptions."""
    kind = type(value)
    if (kind is list or kind is dict) and not value:  # a span's events and resource, mostly
        return "[]" if kind is list else "{}"
    try:
        out = orjson.dumps(value, option=_OPTIONS)
    except TypeError:
        out = None
    if (
        out is not None
        and out.isascii()
        and b"\x7f" not in out
        and not ((b"0.0000" in out or b"e-" in out) and _SMALL_FLOAT.search(out))  # substring tests are ~free
        and orjson.loads(out) == value
    ):
        return out.decode()
    return json.dumps(value, separators=(",", ":"))
