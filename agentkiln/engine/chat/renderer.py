"""Requests -> prompt ids without letting a hostile prompt stall the event loop.

A prompt whose text alone is surely over the context (more characters than the context holds
tokens times the longest token) is refused before templating; any other large prompt is
templated and tokenized on one render thread (large prompts take turns, so a flood of them holds
one core); small ones render on the loop (well under a millisecond). Shared by every engine that
renders prompts itself (embedded, vLLM token-in/token-out).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from agentkiln.engine.base import ChatRequest
from agentkiln.engine.chat.template import ChatTemplate, RenderedPrompt
from agentkiln.engine.errors import EngineRequestError

RENDER_ON_LOOP_CHARS = 8_192  # smaller prompts template + tokenize in well under a millisecond


def prompt_chars(request: ChatRequest) -> int:
    """Characters of text in the messages and tools: a cheap lower bound on the rendered prompt's length."""
    chars = 0
    for msg in request.messages:
        content = msg.get("content")
        chars += len(content) if isinstance(content, str) else 0
        for call in msg.get("tool_calls") or ():
            fn = call.get("function") or {}
            chars += len(str(fn.get("arguments") or ""))
    return chars + (len(json.dumps(request.tools)) if request.tools else 0)


class PromptRenderer:
    """Renders requests with one chat template for a model whose context is `max_context` tokens."""

    def __init__(self, template: ChatTemplate, tokenizer: Any, max_context: int) -> None:
        self.template = template
        self.max_context = max_context
        # No token covers more characters than its vocabulary string has (byte-level: one per byte).
        self._max_token_chars = max((len(t) for t in tokenizer.get_vocab()), default=1) or 1
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-render")

    def render(self, request: ChatRequest) -> RenderedPrompt:
        return self.template.render(request.messages, request.tools or None)

    async def render_async(self, request: ChatRequest) -> RenderedPrompt:
        """`render`, refusing a surely too long prompt first, off the event loop when it is large, and
        refusing a prompt that leaves no room in the context to generate."""
        chars = prompt_chars(request)
        if chars > 2 * self.max_context * self._max_token_chars:  # x2: slack for normalisers that drop text
            raise EngineRequestError(
                f"prompt too long: its {chars} characters are at least {chars // self._max_token_chars} tokens; "
                f"the model's context is {self.max_context} tokens"
            )
        if chars > RENDER_ON_LOOP_CHARS:
            prompt = await asyncio.get_running_loop().run_in_executor(self.pool, self.render, request)
        else:
            prompt = self.render(request)
        if len(prompt.ids) >= self.max_context:
            raise EngineRequestError(f"prompt has {len(prompt.ids)} tokens; the model's context is {self.max_context}")
        return prompt

    async def off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on the render thread (grammar compiles and other CPU work of a request)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
