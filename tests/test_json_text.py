"""json_text.dumps writes exactly what json.dumps(separators=(",", ":")) writes, at orjson speed where it can."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import math
import random
import uuid

import pytest

from agentkiln.store import json_text


class Color(enum.Enum):
    red = "red"


class Level(enum.IntEnum):
    high = 2


class Name(str):
    pass


@dataclasses.dataclass
class Point:
    x: int


def _stdlib(value):
    try:
        return json.dumps(value, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        return type(exc)


def _ours(value):
    try:
        return json_text.dumps(value)
    except (TypeError, ValueError) as exc:
        return type(exc)


EDGES = [
    math.nan, -math.inf, [math.inf], {"x": math.nan}, 1e-05, 7.9e-06, -1.5e-07, 0.0001, 1e16, 1.5e300, 5e-324, -0.0,
    0.30000000000000004, 10**19, -(10**30), "é", "😀", "\u2028", "\x7f", "\x00\x1f\n\t\"\\/", {1: "a"}, {None: 1},
    {True: 1}, (1, 2), [(1, "a")], uuid.UUID(int=7), Color.red, Level.high, {"k": Level.high}, Name("n"),
    {Name("k"): 1}, datetime.datetime(2026, 1, 2), datetime.date(2026, 1, 2), Point(1), b"bytes", {1.5: 2},
    {"kiln.llm.request": {"messages": [{"role": "user", "content": "a:1e-5,[0.00001"}], "temperature": 0.7}},
]  # fmt: skip


@pytest.mark.parametrize("value", EDGES, ids=repr)
def test_edge_cases_match_stdlib(value):
    assert _ours(value) == _stdlib(value)


def test_cycles_raise_like_stdlib():
    loop: list = []
    loop.append(loop)
    with pytest.raises(ValueError):
        json_text.dumps(loop)


def _random_value(rng: random.Random, depth: int = 0):
    pick = rng.random()
    if depth > 3 or pick < 0.5:
        leaf = rng.choice(["float", "int", "str", "const"])
        if leaf == "float":
            return rng.choice([-1, 1]) * rng.random() * 10 ** rng.uniform(-12, 20)
        if leaf == "int":
            return rng.randint(-(2**70), 2**70) if rng.random() < 0.1 else rng.randint(-9, 9)
        if leaf == "str":
            return "".join(rng.choice('ab:,[]0.e-5"\\\n\x01é') for _ in range(rng.randint(0, 8)))
        return rng.choice([None, True, False, math.nan])
    if pick < 0.75:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {"".join(rng.choice("ab1:") for _ in range(3)): _random_value(rng, depth + 1) for _ in range(4)}


def test_random_values_match_stdlib():
    rng = random.Random(5)
    for _ in range(3000):
        value = _random_value(rng)
        assert _ours(value) == _stdlib(value), repr(value)


def test_plain_ascii_json_skips_stdlib(monkeypatch):
    """A span's attributes as the gateway records them are written by orjson, not stdlib json."""
    attributes = {
        "kiln.llm.request": {"messages": [{"role": "user", "content": "What is 6 * 7?"}], "tool_choice": None},
        "kiln.llm.latency_s": 0.0021,
        "kiln.llm.prompt_token_ids": list(range(32)),
        "kiln.llm.response_logprobs": [-0.1, -2.5e-3],
        "kiln.llm.stream": False,
    }
    expected = json.dumps(attributes, separators=(",", ":"))

    def refuse(*args, **kwargs):
        raise AssertionError("stdlib json was used")

    monkeypatch.setattr(json_text.json, "dumps", refuse)
    assert json_text.dumps(attributes) == expected


def test_numpy_values_match_stdlib():
    np = pytest.importorskip("numpy")
    for value in (np.float64(0.1), {"a": np.float32(1.5)}, [np.int64(3)], np.array([1, 2])):
        assert _ours(value) == _stdlib(value)
