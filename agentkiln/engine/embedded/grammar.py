"""Constrained decoding for the embedded engine: structured outputs and forced tool calls (xgrammar).

A request's constraint (`ChatRequest.structured`, or `tool_choice` "required" / a named function)
becomes an xgrammar CompiledGrammar, compiled once per distinct grammar text (bounded LRU cache)
on the render thread, never on the event loop. Each constrained sequence gets its own
GrammarMatcher; the scheduler masks that sequence's logits with the matcher's token bitmask
before sampling and advances the matcher with the sampled token. Sequences without a grammar pay
nothing. When the grammar is complete the sequence ends.

Logprobs: the token is sampled from the masked, renormalised distribution, but the recorded
logprob is the model's own (unmasked, temperature-scaled; sampler.recorded_logprob), the quantity
the learner recomputes, so GRPO's ratio starts at 1 as for top-p. Spans of constrained calls carry
`kiln.llm.constrained = true`, so a consumer can tell the sampling distribution was narrower.

Forced tool calls use the Hermes markup the chat templates parse:
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, arguments following the tool's
parameter schema (strictly: no extra properties unless the schema allows them).

xgrammar is imported lazily: an engine without it serves every unconstrained request.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

import torch

from agentkiln.engine.constraints import build_grammar, grammar_spec, invalid_grammar
from agentkiln.engine.errors import EngineRequestError

__all__ = ["GrammarCache", "GrammarState", "grammar_spec"]

log = logging.getLogger(__name__)

_CACHE_ENTRIES = 64


class GrammarCache:
    """Compiles grammars against one tokenizer (thread-safe), keeping the last `entries` compiled."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: set[int], entries: int = _CACHE_ENTRIES) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_ids = sorted(stop_ids)
        self._entries = entries
        self._compiler: Any = None
        self._cache: collections.OrderedDict[tuple[str, str], Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0  # grammars compiled (cache misses), for tests

    def _xgr(self) -> Any:
        try:
            import xgrammar
        except ImportError:
            raise EngineRequestError(
                "structured outputs need the xgrammar package on the server (pip install 'agentkiln[serve]')"
            ) from None
        if self._compiler is None:
            info = xgrammar.TokenizerInfo.from_huggingface(
                self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_ids
            )
            self._compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        return xgrammar

    def compile(self, spec: tuple[str, str]) -> Any:
        """The CompiledGrammar of a `grammar_spec`; EngineRequestError (400) for an invalid schema."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
            xgr = self._xgr()
            try:
                compiled = self._compiler.compile_grammar(build_grammar(xgr, spec))
            except EngineRequestError:
                raise
            except Exception as exc:  # noqa: BLE001 -- xgrammar raises assorted types for a bad schema
                raise invalid_grammar(spec, exc) from None
            self.compiles += 1
            self._cache[spec] = compiled
            if len(self._cache) > self._entries:
                self._cache.popitem(last=False)
            return compiled

    def matcher(self, compiled: Any) -> GrammarState:
        return GrammarState(self._xgr().GrammarMatcher(compiled), self._vocab_size)


class GrammarState:
    """One sequence's matcher and bitmask; touched only by the scheduler thread."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        import xgrammar

        self._xgr = xgrammar
        self.matcher = matcher
        self.bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (float32 [vocab]) with every token the grammar forbids set to -inf (a copy)."""
        row = logits.clone().unsqueeze(0)
        self.matcher.fill_next_token_bitmask(self.bitmask)
        self._xgr.apply_token_bitmask_inplace(row, self.bitmask.to(row.device))
        return row[0]

    def accept(self, token_id: int) -> None:
        if not self.matcher.accept_token(token_id):
            raise RuntimeError(f"grammar rejected sampled token {token_id}")

    @property
    def done(self) -> bool:
        """The grammar is complete or has accepted its stop token: nothing more may be generated."""
        return bool(self.matcher.is_terminated() or self.matcher.is_completed())
