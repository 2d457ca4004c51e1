"""What a chat template needs from a tool-call parser."""

from __future__ import annotations

import abc
import uuid
from dataclasses import dataclass, field
from typing import Any

from agentkiln.engine.base import ToolCall


@dataclass
class ParsedOutput:
    text: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    parse_error: str | None = None


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolParser(abc.ABC):
    """Reads tool calls out of generated text, and writes history calls the way the model writes them."""

    open_marker: str  # streaming holds text back from here on (calls arrive with the final result)

    @abc.abstractmethod
    def parse(self, text: str, tools: list[dict[str, Any]] | None) -> ParsedOutput:
        """Visible text plus calls; malformed markup -> the whole text, no calls, `parse_error` set."""

    @abc.abstractmethod
    def format_call(self, name: str, arguments: Any) -> str:
        """One history call as the model would have generated it."""
