"""Redaction of production calls before anything is stored.

Deployed traffic carries what users type: e-mail addresses, API keys, card numbers. The
redactor rewrites every string of a call's request and response (messages, tool arguments,
the answer) with the configured patterns and the operator's optional hook; when anything
changed, the recorded token ids and logprobs are dropped too (they spell the original text),
the span says `kiln.llm.redacted`, and the adapter leaves the call out of token-level training
with that reason. Nothing a client sends chooses the patterns: they are server settings.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from agentkiln.protocol import SpanAttrs

# Built-in patterns by name (`kiln serve --redact email,api_key,card`).
BUILTIN_PATTERNS: dict[str, str] = {
    "email": r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}",
    # OpenAI/Anthropic-style secret keys, GitHub tokens, AWS access key ids, our own attempt tokens
    "api_key": r"\b(?:sk-[A-Za-z0-9_\-]{16,}|gh[pousr]_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|kat_[A-Za-z0-9_\-.]{16,})\b",
    "bearer": r"(?i)\bbearer\s+[A-Za-z0-9_\-.=]{16,}",
    "card": r"\b(?:\d[ \-]?){12,18}\d\b",
}
REPLACEMENT = "[REDACTED]"
# What the gateway drops from a span whose text was redacted.
TOKEN_ATTRIBUTES = (SpanAttrs.prompt_token_ids, SpanAttrs.response_token_ids, SpanAttrs.response_logprobs)
TEXT_ATTRIBUTES = (SpanAttrs.request, SpanAttrs.response)

Hook = Callable[[str], str]


def load_hook(spec: str) -> Hook:
    """`module:function` (a str -> str callable the operator installed); a clear error otherwise."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"a redaction hook is 'module:function', got {spec!r}")
    fn = getattr(importlib.import_module(module_name), attr, None)
    if not callable(fn):
        raise ValueError(f"redaction hook {spec!r} is not a callable")
    return fn


def compile_patterns(names_or_regexes: Iterable[str]) -> list[re.Pattern[str]]:
    """Built-in names, or `re:<regex>` for the operator's own pattern."""
    patterns = []
    for item in names_or_regexes:
        item = item.strip()
        if not item:
            continue
        if item.startswith("re:"):
            patterns.append(re.compile(item[3:]))
        elif item in BUILTIN_PATTERNS:
            patterns.append(re.compile(BUILTIN_PATTERNS[item]))
        else:
            raise ValueError(f"unknown redaction pattern {item!r}: use {', '.join(BUILTIN_PATTERNS)} or re:<regex>")
    return patterns


@dataclass
class Redactor:
    patterns: list[re.Pattern[str]] = field(default_factory=list)
    hook: Optional[Hook] = None

    @classmethod
    def build(cls, patterns: Iterable[str] = (), hook: Optional[str] = None) -> Optional["Redactor"]:
        compiled = compile_patterns(patterns)
        loaded = load_hook(hook) if hook else None
        return cls(compiled, loaded) if (compiled or loaded) else None

    def text(self, value: str) -> str:
        for pattern in self.patterns:
            value = pattern.sub(REPLACEMENT, value)
        if self.hook is not None:
            out = self.hook(value)
            value = out if isinstance(out, str) else value
        return value

    def value(self, value: Any) -> Any:
        """`value` with every string inside redacted (dict keys stay: they are field names)."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(v) for v in value]
        return value

    def attributes(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """A call span's attributes, redacted; token ids dropped when any text changed."""
        out = dict(attrs)
        changed = False
        for key in TEXT_ATTRIBUTES:
            if key in out:
                new = self.value(out[key])
                changed = changed or new != out[key]
                out[key] = new
        if changed:
            for key in TOKEN_ATTRIBUTES:
                out.pop(key, None)
            out[SpanAttrs.redacted] = True
        return out
