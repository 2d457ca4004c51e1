"""vLLM driven token-in / token-out: our chat template and tool parser, vLLM's batching and kernels.

Why not vLLM's chat API: the prompt a model sees and the tool syntax it answers in must be the
same whichever engine serves it (SmolLM2's template has no tool syntax at all: vLLM's own chat
route answers 400 to tool requests). So this engine renders the prompt with the model's
`ChatTemplate` (engine/chat), sends the prompt token ids to `/v1/completions` with
`return_token_ids` and `logprobs: 0`, and turns the returned ids into the answer with the same
`build_choice` the embedded engine uses: tool calls, stop strings and recorded ids match what the
embedded engine does for the same tokens. Constraints (structured outputs, forced tool calls) go
as the same xgrammar grammar, in EBNF (`structured_outputs.grammar`).

Logprobs: vLLM runs with `--logprobs-mode processed_logprobs`, the temperature-scaled
distribution the learner recomputes (greedy: log_softmax of the logits), as the embedded engine
records. Two differences remain, both only where the sampling distribution was narrowed: with
top_p < 1 vLLM renormalises over the nucleus, and under a grammar over the allowed tokens (the
embedded engine records the unmasked value); such calls are marked `constrained`.

Weights: trained versions are LoRA adapters loaded at run time under versioned names
(`adapters.LoraAdapters`); each call is sent to the name of its weight set (the agent's own, a
canary candidate's, else the main one, else the base model), and its span records that version.

Modes: `VLLMEngine.managed(options)` starts and supervises the server (process.VLLMServer: 503
while it restarts, adapters reloaded before calls resume); `VLLMEngine(base_url=...)` attaches to
one someone else runs (`upstream:<url>#<served name>?model_dir=<folder>`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from agentkiln.engine.base import ChatRequest, ChatResult, Engine, StreamDelta
from agentkiln.engine.chat import RenderedPrompt, template_for
from agentkiln.engine.chat.output import build_choices
from agentkiln.engine.chat.renderer import PromptRenderer
from agentkiln.engine.constraints import grammar_ebnf, grammar_spec
from agentkiln.engine.embedded.detokenizer import IncrementalDetokenizer
from agentkiln.engine.embedded.sampler import find_stop_ids
from agentkiln.engine.errors import EngineResponseError, EngineUnavailable
from agentkiln.engine.limits import GREEDY_BELOW_TEMPERATURE, unlimited_cap
from agentkiln.engine.model_files import load_tokenizer
from agentkiln.engine.upstream.sse import data_payloads
from agentkiln.engine.upstream.transport import AiohttpTransport, HttpxTransport, dumps, loads
from agentkiln.engine.vllm.adapters import LoraAdapters
from agentkiln.engine.vllm.options import VLLMOptions
from agentkiln.engine.vllm.process import VLLMServer
from agentkiln.protocol import auth_headers

log = logging.getLogger(__name__)

_PATH = "/completions"
BASE_VERSION = "base"


def _generation_config(model_dir: Path) -> Any:
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError):
        return None


class VLLMEngine(Engine):
    """Token-level engine over a vLLM OpenAI server (managed by kiln, or attached to)."""

    def __init__(
        self,
        *,
        base_url: str,
        model_dir: str | Path,
        served_model: str,
        model_name: str | None = None,
        max_context: int = 2048,
        api_key: str | None = None,
        server: VLLMServer | None = None,
        max_adapters: int = 16,
        max_lora_rank: int | None = None,
        timeout_s: float = 600.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`served_model`: the base model's name in vLLM; `model_name`: the name kiln reports (default the
        same); `transport` (an httpx transport) replaces the network, for tests."""
        self.base_url = base_url.rstrip("/")
        self.model_dir = Path(model_dir)
        self.served_model = served_model
        self.model_name = model_name or served_model
        self.max_context = max_context
        self.server = server
        self.tokenizer = load_tokenizer(self.model_dir)
        self.chat_template = template_for(self.tokenizer, self.model_dir)
        self.renderer = PromptRenderer(self.chat_template, self.tokenizer, max_context)
        self.stop_ids = sorted(find_stop_ids(self.tokenizer, _generation_config(self.model_dir)))
        headers = auth_headers(api_key)
        self._http: AiohttpTransport | HttpxTransport = (
            AiohttpTransport(self.base_url, headers, timeout_s)
            if transport is None
            else HttpxTransport(self.base_url, headers, timeout_s, transport)
        )
        self.adapters = LoraAdapters(
            self.base_url.removesuffix("/v1"), headers, max_adapters, transport, max_rank=max_lora_rank
        )
        self._main_version = BASE_VERSION  # the main weights' version while no main adapter is served
        if server is not None:
            server.on_restart.append(self.adapters.reload)

    @classmethod
    def managed(cls, options: VLLMOptions, log_path: str | Path | None = None) -> VLLMEngine:
        """An engine whose vLLM server kiln starts (in `start`), supervises and stops."""
        server = VLLMServer(options, log_path)
        return cls(
            base_url=server.base_url,
            model_dir=options.model_dir,
            served_model=options.model_name,
            max_context=options.max_model_len,
            server=server,
            max_adapters=options.max_cpu_loras,
            max_lora_rank=options.max_lora_rank,
        )

    # ---- versions and routing -------------------------------------------------------------------

    @property
    def model_version(self) -> str:
        return self.adapters.version_for(None) or self._main_version

    def version_for(self, agent: str | None) -> str:
        return self.adapters.version_for(agent) or self.model_version

    def weights_key(self, agent: str | None, variant: str | None = None) -> str | None:
        return self.adapters.key_for(agent, variant)

    @property
    def agent_versions(self) -> dict[str, str]:
        return {str(k): a.version for k, a in self.adapters.served.items() if k is not None}

    def served_name(self, key: str | None) -> str:
        """The vLLM model name a call of weight set `key` is sent to."""
        return self.adapters.name_for(key) or self.adapters.name_for(None) or self.served_model

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # ---- requests -------------------------------------------------------------------------------

    def _check_ready(self) -> None:
        if self.server is not None and not self.server.ready:
            raise self.server.unavailable()

    async def _prepare(self, request: ChatRequest, stream: bool) -> tuple[RenderedPrompt, dict[str, Any], str]:
        self._check_ready()
        prompt = await self.renderer.render_async(request)
        spec = grammar_spec(request)
        key = self.weights_key(request.agent, request.variant)
        version = self.version_for(key)  # the name below serves exactly this version
        body: dict[str, Any] = {
            "model": self.served_name(key),
            "prompt": prompt.ids,
            "max_tokens": min(request.max_tokens or unlimited_cap(request.n), self.max_context - len(prompt.ids)),
            "temperature": 0.0 if request.temperature < GREEDY_BELOW_TEMPERATURE else request.temperature,
            "top_p": request.top_p,
            "n": request.n,
            "logprobs": 0,
            "return_token_ids": True,
            "stop_token_ids": self.stop_ids,
            "skip_special_tokens": True,
        }
        if request.stop:
            body["stop"] = [s for s in request.stop if s]
        if request.seed is not None:
            body["seed"] = request.seed
        if spec is not None:
            body["structured_outputs"] = {"grammar": await self.renderer.off_loop(grammar_ebnf, spec)}
        for name, value in request.passthrough.items():  # top_k, min_p, penalties, ...: unchanged
            body.setdefault(name, value)
        if stream:
            body["stream"] = True
        return prompt, body, version

    def _result(self, request: ChatRequest, prompt: RenderedPrompt, outs: list[tuple[list[int], list[float], str]], version: str) -> ChatResult:
        choices = build_choices(self.tokenizer, self.chat_template, request, outs)
        return ChatResult(
            prompt_ids=prompt.ids, prompt_text=prompt.text, choices=choices, model=self.model_name, model_version=version
        )

    async def chat(self, request: ChatRequest) -> ChatResult:
        prompt, body, version = await self._prepare(request, stream=False)
        data = await self._post(body)
        raw = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(raw, list) or len(raw) != request.n:
            raise EngineResponseError(f"vLLM answered something that is not {request.n} completion(s): {str(data)[:200]}")
        outs = [_choice_output(c) for c in sorted(raw, key=lambda c: c.get("index", 0))]
        return self._result(request, prompt, outs, version)

    async def _post(self, body: dict[str, Any]) -> Any:
        try:
            return await self._http.post_json(_PATH, dumps(body))
        except EngineUnavailable:
            if self.server is not None and not self.server.ready:
                raise self.server.unavailable() from None
            raise

    async def chat_stream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        if request.n != 1:
            raise ValueError("streaming supports n == 1 only")
        prompt, body, version = await self._prepare(request, stream=True)
        ids: list[int] = []
        logprobs: list[float] = []
        finish = "stop"
        detok = IncrementalDetokenizer(self.tokenizer)
        visible = self.chat_template.stream_filter(request.stop, bool(request.tools))
        shown: list[str] = []
        tail_ids: list[int] = []
        async with self._http.stream(_PATH, dumps(body)) as batches:
            async for batch in batches:
                payloads, done = data_payloads(batch)
                new_ids: list[int] = []
                for payload in payloads:
                    chunk = loads(payload)
                    for c in (chunk.get("choices") or []) if isinstance(chunk, dict) else ():
                        delta_ids = c.get("token_ids")
                        if delta_ids is None:
                            raise EngineResponseError("vLLM streamed no token_ids (it needs return_token_ids support)")
                        new_ids += delta_ids
                        logprobs += _token_logprobs(c)
                        finish = c.get("finish_reason") or finish
                ids += new_ids
                if done:  # what came with the end goes out with the final result
                    tail_ids = new_ids
                    break
                if new_ids:
                    text = "".join(visible.feed(detok.add(t)) for t in new_ids)
                    shown.append(text)
                    yield StreamDelta(index=0, text=text, token_ids=new_ids)
        if len(logprobs) != len(ids):
            raise EngineResponseError(f"vLLM streamed {len(logprobs)} logprobs for {len(ids)} tokens")
        final = self._result(request, prompt, [(ids, logprobs, _finish(finish))], version)
        text, sent = final.choices[0].text, "".join(shown)
        delta = text[len(sent) :] if text.startswith(sent) else ""
        yield StreamDelta(index=0, text=delta, token_ids=tail_ids, final=final)

    # ---- weights and lifecycle ------------------------------------------------------------------

    async def load_weights(self, path: str, version: str, agent: str | None = None) -> None:
        """Serve a LoRA adapter as `agent`'s (None: the main) weights; the base model's folder means the base."""
        if Path(path).resolve() == self.model_dir.resolve():
            await self.adapters.unload(agent)
            if agent is None:
                self._main_version = version
            return
        await self.adapters.load(agent, path, version)

    async def unload_weights(self, agent: str) -> None:
        if agent is None:
            raise ValueError("the main weights cannot be unloaded")
        await self.adapters.unload(agent)

    async def start(self) -> None:
        if self.server is not None:
            await self.server.start()

    async def close(self) -> None:
        if self.server is None:  # attached: leave the server without our adapters
            with contextlib.suppress(Exception):
                await self.adapters.unload_all()
        await self._http.aclose()
        self.renderer.close()
        if self.server is not None:
            await self.server.close()

    def status(self) -> dict[str, Any]:
        """For `/api/v1/engine`: the server process and the adapter names calls are routed to."""
        return {
            "vllm_url": self.base_url,
            "vllm_pid": self.server.pid if self.server is not None else None,
            "vllm_ready": self.server.ready if self.server is not None else None,
            "vllm_restarts": self.server.restarts if self.server is not None else 0,
            "vllm_error": self.server.last_error if self.server is not None else None,
            "lora_names": {str(k) if k is not None else "main": a.name for k, a in self.adapters.served.items()},
        }


def _token_logprobs(choice: Mapping[str, Any]) -> list[float]:
    values = (choice.get("logprobs") or {}).get("token_logprobs") or []
    return [float(v) if v is not None else 0.0 for v in values]


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _choice_output(choice: Mapping[str, Any]) -> tuple[list[int], list[float], str]:
    ids = choice.get("token_ids")
    if not isinstance(ids, list):
        raise EngineResponseError("vLLM returned no token_ids (it needs return_token_ids support: vLLM >= 0.10)")
    logprobs = _token_logprobs(choice)
    if len(logprobs) != len(ids):
        raise EngineResponseError(f"vLLM returned {len(logprobs)} logprobs for {len(ids)} tokens")
    return list(ids), logprobs, _finish(choice.get("finish_reason"))
