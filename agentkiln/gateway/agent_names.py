"""The user's agent-name map: name a call's agent from its system prompt, with no change to the agent.

Agents that share one client (an AutoGen team on one `OpenAIChatCompletionClient`, a CrewAI crew on
one LLM) send their calls down the same URL with the same headers, so nothing the gateway already
reads tells them apart. What does differ is each agent's own prompt. `AgentNames` is an ordered list
of (regex, name) rules searched (`re.search`: anchor with `^` for "starts with") in the text of the
call's system and developer messages — for the Responses API that is `instructions` (the gateway
turns it into the first system message) plus any system/developer input items. The first rule that
matches any of them names the call.

Given as `Trainer(agent_names={"^You review": "reviewer"})`, `kiln serve --agent-name
'^You review=reviewer'` (repeatable) or `create_app(agent_names=...)`; where it sits among the
other ways of naming an agent is `recording.resolve_agent_name`'s docstring.

Limits: at most `MAX_RULES` rules of at most `MAX_PATTERN_CHARS` characters each; only the first
`MAX_SEARCH_MESSAGES` system/developer messages are searched, each in its first `MAX_SEARCH_CHARS`
characters, so a rule costs a bounded time per call whatever the client sends (an agent's prompt
comes first and says who it is near its start).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from agentkiln.protocol import validate_agent_name

MAX_RULES = 256
MAX_PATTERN_CHARS = 1_000
MAX_SEARCH_CHARS = 20_000
MAX_SEARCH_MESSAGES = 16  # a body of thousands of system messages must not multiply the search
PROMPT_ROLES = ("system", "developer")

AgentNamesSpec = Union["AgentNames", Mapping[str, str], Iterable[tuple[str, str]], None]


@dataclass(frozen=True)
class AgentNameRule:
    pattern: re.Pattern[str]
    name: str


class AgentNames:
    """Ordered (regex, agent name) rules; `name_for(messages)` is the first rule's name that matches.

    Built from a mapping (its order is the rules' order) or (regex, name) pairs. Every rule is
    checked here: a bad regex, an invalid name or too many / too long rules raise ValueError
    that names the rule, so a typo fails at start-up rather than leaving calls unnamed.
    """

    __slots__ = ("rules",)

    def __init__(self, rules: Union[Mapping[str, str], Iterable[tuple[str, str]]] = ()) -> None:
        pairs = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
        if len(pairs) > MAX_RULES:
            raise ValueError(f"agent_names: {len(pairs)} rules, at most {MAX_RULES}")
        built = []
        for pair in pairs:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise ValueError(f"agent_names: each rule is (regex, name), got {pair!r}")
            pattern, name = pair
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"agent_names: the regex must be a non-empty string, got {pattern!r}")
            if len(pattern) > MAX_PATTERN_CHARS:
                raise ValueError(
                    f"agent_names: regex {pattern[:40]!r}... has {len(pattern)} characters, at most {MAX_PATTERN_CHARS}"
                )
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"agent_names: bad regex {pattern!r}: {exc}") from None
            try:
                built.append(AgentNameRule(compiled, validate_agent_name(name)))
            except ValueError as exc:
                raise ValueError(f"agent_names: rule {pattern!r}: {exc}") from None
        self.rules: tuple[AgentNameRule, ...] = tuple(built)

    @classmethod
    def of(cls, spec: AgentNamesSpec) -> AgentNames:
        """An AgentNames from what a caller may give (None: no rules)."""
        if isinstance(spec, AgentNames):
            return spec
        return cls(spec or ())

    @classmethod
    def from_cli(cls, items: Sequence[str]) -> AgentNames:
        """From `REGEX=NAME` strings (`kiln serve --agent-name`); split at the last '=' (a name has none)."""
        pairs = []
        for item in items:
            pattern, sep, name = item.rpartition("=")
            if not sep or not pattern:
                raise ValueError(f"--agent-name takes REGEX=NAME, got {item!r}")
            pairs.append((pattern, name))
        return cls(pairs)

    def name_for(self, messages: Sequence[Mapping[str, Any]]) -> Optional[str]:
        """The name of the first rule found in a system/developer message's text; None if none is."""
        if not self.rules:
            return None
        prompts = (
            msg["content"][:MAX_SEARCH_CHARS]
            for msg in messages
            if msg.get("role") in PROMPT_ROLES and isinstance(msg.get("content"), str) and msg["content"]
        )
        texts = list(itertools.islice(prompts, MAX_SEARCH_MESSAGES))
        for rule in self.rules:
            if any(rule.pattern.search(text) for text in texts):
                return rule.name
        return None

    def __len__(self) -> int:
        return len(self.rules)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __repr__(self) -> str:
        return f"AgentNames({[(r.pattern.pattern, r.name) for r in self.rules]!r})"
