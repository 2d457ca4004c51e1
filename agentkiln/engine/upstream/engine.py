"""Engine that forwards to any OpenAI-compatible server (vLLM, SGLang, a hosted API).

Exact token ids matter for RL, so requests ask for `logprobs: true` and vLLM's
`return_token_ids: true`; vLLM then returns `prompt_token_ids` (top level) and per-choice
`token_ids`. Servers that ignore it get an approximation: the prompt is rendered with our
ChatML format and the answer re-tokenized with a local tokenizer. Those ids may differ from
what the server's model saw (different chat template, non-canonical tokenization of the
sampled text), and logprobs are dropped when their count does not match the ids, so such
spans are marked unusable for training rather than silently misaligned.

The model served is the one configured (`model`), whatever name the agent asks for (framework
examples ask for `gpt-4.1`, which a vLLM serving another model answers with 404); names in
`model_aliases` pass through (mapped to their upstream name).

Weights: published adapters are loaded through vLLM's runtime LoRA API under versioned names
(engine/vllm/adapters.py), where the server allows it; a server that does not makes the load fail
with an error saying so (the previous weights keep serving). `agent_models={"writer": "writer"}`
statically sends agent "writer"'s calls to a model name the server already serves (`--lora-modules`),
recorded as version "<model_version>:writer". For token-exact serving with our chat template and
tool parser give the model folder instead (`upstream:<url>#model?model_dir=...`: engine/vllm).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx

from agentkiln.engine.base import ChatChoice, ChatRequest, ChatResult, Engine, StreamDelta, ToolCall
from agentkiln.engine.chat.smollm2 import render_prompt
from agentkiln.engine.chat.tool_parsers.hermes import format_tool_call
from agentkiln.engine.errors import EngineResponseError
from agentkiln.engine.upstream.sse import data_payloads
from agentkiln.engine.upstream.transport import AiohttpTransport, HttpxTransport, dumps, loads
from agentkiln.engine.vllm.adapters import LoraAdapters
from agentkiln.protocol import auth_headers

log = logging.getLogger(__name__)

_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "function_call": "tool_calls"}
_PATH = "/chat/completions"


class UpstreamEngine(Engine):
    """Chat completions forwarded to `base_url`; raises only `agentkiln.engine.errors` classes.

    `transport` (an httpx transport) replaces the network, for tests and in-process apps.
    """

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
        agent_models: Mapping[str, str] | None = None,
        model_aliases: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model_name = model
        self.agent_models = dict(agent_models or {})  # agent name -> upstream model name (e.g. a vLLM LoRA)
        self.model_aliases = dict(model_aliases or {})  # requested model name -> upstream name, passed through
        self.api_key = api_key
        self.tokenizer = tokenizer
        self._version = model_version
        self._timeout = timeout_s
        headers = auth_headers(api_key)
        self._http: AiohttpTransport | HttpxTransport = (
            AiohttpTransport(self.base_url, headers, timeout_s)
            if transport is None
            else HttpxTransport(self.base_url, headers, timeout_s, transport)
        )
        self.adapters = LoraAdapters(self.base_url.removesuffix("/v1"), headers, transport=transport)

    @property
    def model_version(self) -> str:
        return self._version

    def version_for(self, agent: str | None) -> str:
        loaded = self.adapters.version_for(agent) or self.adapters.version_for(None)
        if loaded is not None:
            return loaded
        served = self.agent_models.get(agent) if agent is not None else None
        return f"{self._version}:{served}" if served else self._version

    def weights_key(self, agent: str | None, variant: str | None = None) -> str | None:
        return self.adapters.key_for(agent, variant)

    @property
    def agent_versions(self) -> dict[str, str]:
        agents = {str(k) for k in self.adapters.served if k is not None} | set(self.agent_models)
        return {agent: self.version_for(agent) for agent in sorted(agents)}

    def _model_for(self, request: ChatRequest) -> str:
        """The upstream model name: a loaded adapter's, an agent's static one, an alias, else the configured model."""
        key = self.weights_key(request.agent, request.variant)
        loaded = self.adapters.name_for(key) or self.adapters.name_for(None)
        if loaded is not None:
            return loaded
        return (
            self.agent_models.get(request.agent or "")
            or self.model_aliases.get(request.model or "")
            or self.model_name
        )

    async def load_weights(self, path: str, version: str, agent: str | None = None) -> None:
        """Load a published LoRA adapter through the server's runtime LoRA API (vLLM); see adapters."""
        await self.adapters.load(agent, path, version)

    async def unload_weights(self, agent: str) -> None:
        await self.adapters.unload(agent)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""

    def _body(self, request: ChatRequest, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self._model_for(request),
            "messages": request.messages,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "n": request.n,
            "logprobs": True,
            "return_token_ids": True,  # vLLM extension; other servers ignore unknown fields
        }
        if request.max_tokens is not None:  # none: the server generates until a stop or its context limit
            body["max_tokens"] = request.max_tokens
        if request.tools:
            body["tools"] = request.tools
        if request.tool_choice is not None:
            body["tool_choice"] = request.tool_choice
        if request.stop:
            body["stop"] = request.stop
        if request.seed is not None:
            body["seed"] = request.seed
        if request.structured is not None:
            body["response_format"] = request.structured.response_format()
        for key, value in request.passthrough.items():  # top_k, penalties, guided_*, ...: unchanged
            body.setdefault(key, value)
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def chat(self, request: ChatRequest) -> ChatResult:
        data = await self._http.post_json(_PATH, dumps(self._body(request, stream=False)))
        if not isinstance(data, dict) or not isinstance(data.get("choices") or [], list):
            raise EngineResponseError(f"upstream answered JSON that is not a chat completion: {str(data)[:200]}")
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
        tail_text: str = ""
        tail_ids: list[int] = []
        async with self._http.stream(_PATH, dumps(self._body(request, stream=True))) as batches:
            done = False
            async for batch in batches:
                # One delta per network read: what arrived together goes to the client together.
                new_text: list[str] = []
                new_ids: list[int] = []
                payloads, done = data_payloads(batch)
                for payload in payloads:
                    chunk = loads(payload)
                    if not isinstance(chunk, dict):
                        raise EngineResponseError(f"upstream stream event is not a JSON object: {payload[:200]!r}")
                    if chunk.get("prompt_token_ids") is not None:
                        prompt_ids = chunk["prompt_token_ids"]
                    for c in chunk.get("choices") or []:
                        if c.get("prompt_token_ids") is not None:  # some vLLM versions put it on the choice
                            prompt_ids = c["prompt_token_ids"]
                        delta = c.get("delta") or {}
                        ids = c.get("token_ids") or []
                        have_ids = have_ids or c.get("token_ids") is not None
                        token_ids += ids
                        new_ids += ids
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
                        new_text.append(content)
                text = "".join(new_text)
                if done:  # the last text goes out with the final result, in one write
                    tail_text, tail_ids = text, new_ids
                    break
                if text or new_ids:
                    yield StreamDelta(index=0, text=text, token_ids=new_ids)
        message = {
            "content": "".join(text_parts),
            "tool_calls": [
                {"id": s["id"], "type": "function", "function": {"name": s["name"], "arguments": s["arguments"]}}
                for _, s in sorted(calls.items())
            ],
        }
        choice = self._choice(0, message, token_ids if have_ids else None, logprobs, finish)
        yield StreamDelta(
            index=0, text=tail_text, token_ids=tail_ids, final=self._result(request, prompt_ids, [choice])
        )

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
            model_version=self.version_for(self.weights_key(request.agent, request.variant)),
        )

    async def close(self) -> None:
        await self._http.aclose()
