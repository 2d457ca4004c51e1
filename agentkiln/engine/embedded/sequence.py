"""Per-sequence state while it generates, and the record it finishes with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from agentkiln.engine.embedded.sampler import StopStringMatcher


@dataclass
class SeqOutput:
    ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"
    model_version: str


@dataclass
class Sequence:
    """One sequence being generated; touched only by the scheduler thread after submission."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: StopStringMatcher | None  # None: no stop strings (stop ids only)
    generator: torch.Generator
    on_token: Callable[[int, SeqOutput | None], None]  # (token id, output when this token ends it)
    on_error: Callable[[BaseException], None]
    grammar: Any = None  # a grammar.GrammarState when the output is constrained (structured / forced tool call)
    agent: str | None = None  # whose weights to use, if that agent has its own (resolved when admitted)
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finished: bool = False
    cancelled: bool = False
