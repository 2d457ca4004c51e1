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
import json
import logging
import re
import threading
from typing import Any

import torch

from agentkiln.engine.base import ChatRequest
from agentkiln.engine.chat.tool_parsers.hermes import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from agentkiln.engine.errors import EngineRequestError

log = logging.getLogger(__name__)

_CACHE_ENTRIES = 64


def grammar_spec(request: ChatRequest) -> tuple[str, str] | None:
    """(kind, source) of the request's constraint, or None: 'json' (any object), 'schema', 'strict' or 'tool_call'."""
    forced = _forced_tools(request)
    if forced:
        return "tool_call", json.dumps(_tool_call_schema(forced), sort_keys=True)
    spec = request.structured
    if spec is None:
        return None
    if spec.type == "json_object" or spec.json_schema is None:
        return "json", '{"type": "object"}'
    return ("strict" if spec.strict else "schema"), json.dumps(spec.json_schema, sort_keys=True)


def _forced_tools(request: ChatRequest) -> list[dict[str, Any]]:
    """The function definitions a tool_choice forces a call to (empty: no forced call)."""
    choice, tools = request.tool_choice, request.tools
    if not tools or choice in (None, "none", "auto"):
        return []
    fns = [t.get("function", t) for t in tools]
    if choice == "required":
        return fns
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") or choice.get("name")
        named = [f for f in fns if f.get("name") == name]
        if not named:
            raise EngineRequestError(f"tool_choice names function {name!r}, which is not among the tools")
        return named
    return []


def _tool_call_schema(fns: list[dict[str, Any]]) -> dict[str, Any]:
    """A JSON schema for `{"name": <one of fns>, "arguments": <its parameters>}`."""
    options = []
    for fn in fns:
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn["name"]}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return options[0] if len(options) == 1 else {"anyOf": options}


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
            kind, source = spec
            try:
                if kind in ("json", "schema", "strict"):  # strict: no properties beyond the schema's
                    compiled = self._compiler.compile_json_schema(
                        source, strict_mode=kind == "strict", any_whitespace=False
                    )
                else:
                    grammar = xgr.Grammar.concat(
                        xgr.Grammar.from_regex(re.escape(TOOL_CALL_OPEN)),
                        xgr.Grammar.from_json_schema(source, strict_mode=True, any_whitespace=False),
                        xgr.Grammar.from_regex(re.escape(TOOL_CALL_CLOSE)),
                    )
                    compiled = self._compiler.compile_grammar(grammar)
            except Exception as exc:  # noqa: BLE001 -- xgrammar raises assorted types for a bad schema
                what = "tool parameters schema" if kind == "tool_call" else "JSON schema"
                raise EngineRequestError(f"invalid {what}: {str(exc).strip()[:500]}") from None
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
