"""The chat-template interface: OpenAI messages + tools -> prompt ids, generated text -> content + tool calls.

Why an interface: the prompt format and the tool-call syntax belong to the model, not to the
engine. Each implementation renders prompts its model was trained on and owns the tool parser
that reads that model's calls back; the engine only asks `render`, `parse` and `stream_filter`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

from agentkiln.engine.chat.tool_parsers.base import ParsedOutput, ToolParser
from agentkiln.engine.chat.tool_parsers.hermes import HermesToolParser


@dataclass
class RenderedPrompt:
    """The prompt as text (for logs/spans) and as the exact token ids fed to the model."""

    text: str
    ids: list[int]


class ChatTemplate(abc.ABC):
    """One model family's prompt format plus its tool-call parser."""

    name: str = "template"

    def __init__(self, tokenizer: Any, tool_parser: ToolParser | None = None) -> None:
        self.tokenizer = tokenizer
        self.tool_parser = tool_parser or HermesToolParser()

    @abc.abstractmethod
    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> RenderedPrompt:
        """Prompt text and ids, ending with the assistant generation prompt."""

    def parse(self, text: str, tools: list[dict[str, Any]] | None) -> ParsedOutput:
        return self.tool_parser.parse(text, tools)

    def stream_markers(self, stop: list[str], tools: bool) -> list[str]:
        """Strings where streamed text must end: stop strings and, when tools were offered, call markup."""
        return [s for s in stop if s] + ([self.tool_parser.open_marker] if tools else [])

    def stream_filter(self, stop: list[str], tools: bool) -> StreamingVisibleText:
        return StreamingVisibleText(self.stream_markers(stop, tools))


def visible_prefix(raw: str, markers: list[str]) -> str:
    """The part of `raw` safe to show: cut at the first marker, drop a trailing incomplete character,
    and hold back a tail that could still grow into a marker."""
    cut = min((i for i in (raw.find(m) for m in markers) if i >= 0), default=len(raw))
    text = raw[:cut].rstrip("\ufffd")
    hold = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), hold, -1):
            if text.endswith(marker[:k]):
                hold = k
                break
    return text[: len(text) - hold]


def stream_visible_text(raw: str, stop: list[str], tools: bool, tool_marker: str = "<tool_call>") -> str:
    """The part of partially generated text that is safe to stream to the client now.

    Cut at a stop string or (when tools were offered) at tool-call markup, drop an incomplete
    multi-byte character, and hold back a tail that could still grow into one of those markers.
    The final ChatResult stays authoritative (tool calls arrive with it).
    """
    return visible_prefix(raw, [s for s in stop if s] + ([tool_marker] if tools else []))


class StreamingVisibleText:
    """`visible_prefix` applied incrementally: feed raw text deltas, get the newly visible text.

    Only the unshown tail is searched: shown text never holds the start of a marker (a tail that
    could grow into one is always held back), so the result equals re-running `visible_prefix`
    on the whole text, at cost linear in the text length.
    """

    def __init__(self, markers: list[str]) -> None:
        self.markers = [m for m in markers if m]
        self._tail = ""
        self._cut = False

    def feed(self, text: str) -> str:
        if self._cut or not text:
            return ""
        tail = self._tail + text
        if not self.markers:
            shown = tail.rstrip("\ufffd")
        else:
            shown = visible_prefix(tail, self.markers)
            self._cut = any(m in tail for m in self.markers)
        self._tail = tail[len(shown) :]
        return shown
