"""Engine that forwards to any OpenAI-compatible server (vLLM, SGLang, a hosted API).

Exact token ids matter for RL, so requests ask for `logprobs: true` and vLLM's
`return_token_ids: true`; vLLM then returns `prompt_token_ids` (top level) and per-choice
`token_ids`. Servers that ignore it get an approximation: the prompt is rendered with our
ChatML format and the answer re-tokenized with a local tokenizer. Those ids may differ from
what the server's model saw (different chat template, non-canonical tokenization of the
sampled text), and logprobs are dropped when their count does not match the ids, so such
spans are marked unusable for training rather than silently misaligned.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from agentkiln.engine.base import ChatChoice, ChatRequest, ChatResult, Engine, StreamDelta, ToolCall
from agentkiln.engine.chat_format import format_tool_call, render_prompt

log = logging.getLogger(__name__)

_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "function_call": "tool_calls"}


class UpstreamEngine(Engine):
    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        api_key: str | None = None,
        tokenizer: Any = None,
        model_version: str = "upstream",
        timeout_s: float = 600.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model_name = model
        self.api_key = api_key
        self.tokenizer = tokenizer
        self._version = model_version
        self._timeout = timeout_s
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    @property
    def model_version(self) -> str:
        return self._version

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._client = httpx.AsyncClient(
                base_url=self.base_url, headers=headers, timeout=self._timeout, transport=self._transport
            )
        return self._client

    def _body(self, request: ChatRequest, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model or self.model_name,
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "n": request.n,
            "logprobs": True,
            "return_token_ids": True,  # vLLM extension; other servers ignore unknown fields
        }
        if request.tools:
            body["tools"] = request.tools
        if request.tool_choice is not None:
            body["tool_choice"] = request.tool_choice
        if request.stop:
            body["stop"] = request.stop
        if request.seed is not None:
            body["seed"] = request.seed
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def chat(self, request: ChatRequest) -> ChatResult:
        resp = await self._http().post("/chat/completions", json=self._body(request, stream=False))
        resp.raise_for_status()
        data = resp.json()
        choices = [
            self._choice(
                index=c.get("index", i),
                message=c.get("message") or {},
                token_ids=c.get("token_ids"),
                logprobs=[t.get("logprob", 0.0) for t in ((c.get("logprobs") or {}).get("content") or [])],
                finish_reason=c.get("finish_reason"),
            )
            for i, c in enumerate(data.get("choices") or [])
        ]
        return self._result(request, data.get("prompt_token_ids"), choices)

    async def chat_stream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        if request.n != 1:
            raise ValueError("streaming supports n == 1 only")
        prompt_ids: list[int] | None = None
        token_ids: list[int] = []
        have_ids = False
        logprobs: list[float] = []
        text_parts: list[str] = []
        calls: dict[int, dict[str, str]] = {}
        finish: str | None = None
        async with self._http().stream("POST", "/chat/completions", json=self._body(request, stream=True)) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if chunk.get("prompt_token_ids") is not None:
                    prompt_ids = chunk["prompt_token_ids"]
                for c in chunk.get("choices") or []:
                    if c.get("prompt_token_ids") is not None:  # some vLLM versions put it on the choice
                        prompt_ids = c["prompt_token_ids"]
                    delta = c.get("delta") or {}
                    new_ids = c.get("token_ids") or []
                    have_ids = have_ids or c.get("token_ids") is not None
                    token_ids += new_ids
                    logprobs += [t.get("logprob", 0.0) for t in ((c.get("logprobs") or {}).get("content") or [])]
                    for tc in delta.get("tool_calls") or []:
                        slot = calls.setdefault(tc.get("index", 0), {"id": "", "name": "", "arguments": ""})
                        slot["id"] = tc.get("id") or slot["id"]
                        fn = tc.get("function") or {}
                        slot["name"] += fn.get("name") or ""
                        slot["arguments"] += fn.get("arguments") or ""
                    finish = c.get("finish_reason") or finish
                    content = delta.get("content") or ""
                    text_parts.append(content)
                    if content or new_ids:
                        yield StreamDelta(index=0, text=content, token_ids=list(new_ids))
        message = {
            "content": "".join(text_parts),
            "tool_calls": [
                {"id": s["id"], "type": "function", "function": {"name": s["name"], "arguments": s["arguments"]}}
                for _, s in sorted(calls.items())
            ],
        }
        choice = self._choice(0, message, token_ids if have_ids else None, logprobs, finish)
        yield StreamDelta(index=0, final=self._result(request, prompt_ids, [choice]))

    def _choice(
        self,
        index: int,
        message: dict[str, Any],
        token_ids: list[int] | None,
        logprobs: list[float],
        finish_reason: str | None,
    ) -> ChatChoice:
        text = message.get("content") or ""
        tool_calls = [
            ToolCall(
                id=tc.get("id") or f"call_{index}_{j}",
                name=(tc.get("function") or {}).get("name", ""),
                arguments=(tc.get("function") or {}).get("arguments") or "{}",
            )
            for j, tc in enumerate(message.get("tool_calls") or [])
        ]
        if token_ids is not None:
            ids = list(token_ids)
            raw = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else text
        else:
            # Approximation: our rendering of what the model produced, re-tokenized locally.
            raw = "\n".join([text] * bool(text) + [format_tool_call(t.name, t.arguments) for t in tool_calls])
            ids = self._tokenize(raw)
        if len(logprobs) != len(ids):
            if logprobs:
                log.warning("upstream returned %d logprobs for %d token ids; dropping them", len(logprobs), len(ids))
            logprobs = []
        finish = "tool_calls" if tool_calls else _FINISH.get(finish_reason or "stop", "stop")
        return ChatChoice(
            index=index,
            text=text,
            raw_text=raw,
            tool_calls=tool_calls,
            finish_reason=finish,
            response_ids=ids,
            logprobs=logprobs,
        )

    def _tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None or not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _result(self, request: ChatRequest, prompt_ids: list[int] | None, choices: list[ChatChoice]) -> ChatResult:
        prompt_text = None
        if prompt_ids is None:
            if self.tokenizer is not None:
                rendered = render_prompt(self.tokenizer, request.messages, request.tools or None)
                prompt_ids, prompt_text = rendered.ids, rendered.text
            else:
                log.warning("upstream returned no prompt_token_ids and no local tokenizer is set")
                prompt_ids = []
        return ChatResult(
            prompt_ids=list(prompt_ids),
            prompt_text=prompt_text,
            choices=choices,
            model=self.model_name,
            model_version=self._version,
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
