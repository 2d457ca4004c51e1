"""Embedded transformers engine, the async front end: chat, streaming, weight swaps, close.

Exact ids + logprobs for RL (see sampler), continuous batching on one scheduler thread (see
scheduler). Callers on the event loop get futures / queues fed from that thread through
`loop.call_soon_threadsafe`; weight and cache swaps are tasks the thread runs between batches.
Prompt format and tool-call syntax come from the model's chat template (see engine.chat).

Hostile input: a prompt whose text alone is surely over the context (more characters than the
context holds tokens times the longest token) is refused before templating; any other large
prompt is templated and tokenized in the engine's render thread (one: large prompts take turns, so
a flood of them holds one core), so it never stalls the event loop. A caller
that stops waiting (client gone, task cancelled) cancels its sequences: the scheduler drops
their rows, and their KV with them, at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import torch

from agentkiln.engine.base import ChatRequest, ChatResult, Engine, StreamDelta
from agentkiln.engine.chat import ChatTemplate, RenderedPrompt, template_for
from agentkiln.engine.chat.output import build_choices
from agentkiln.engine.chat.renderer import PromptRenderer
from agentkiln.engine.embedded.detokenizer import IncrementalDetokenizer
from agentkiln.engine.embedded.grammar import GrammarCache, grammar_spec
from agentkiln.engine.embedded.prefix_cache import PrefixCache
from agentkiln.engine.embedded.sampler import StopStringMatcher, find_stop_ids
from agentkiln.engine.embedded.scheduler import EngineStats, Scheduler
from agentkiln.engine.embedded.sequence import SeqOutput, Sequence
from agentkiln.engine.embedded.weights import WeightSets
from agentkiln.engine.limits import unlimited_cap
from agentkiln.engine.model_files import load_model, load_tokenizer
from agentkiln.hardware import resolve_dtype

log = logging.getLogger(__name__)

Callbacks = tuple[Callable[[int, SeqOutput | None], None], Callable[[BaseException], None]]


class TransformersEngine(Engine):
    """Serves a causal LM from a local folder (safetensors + tokenizer) with batching and weight swaps."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        model_name: str = "smollm2-135m-instruct",
        dtype: str = "auto",
        max_batch_size: int = 8,
        device: str = "cpu",
        num_threads: int | None = None,
        gather_window_s: float = 0.005,
        prefix_cache_tokens: int = 16_384,
        prefix_cache_entries: int = 32,
        chat_template: ChatTemplate | None = None,
        max_waiting: int = 256,
    ) -> None:
        """`prefix_cache_tokens=0` disables prefix caching (SmolLM2-135M KV: ~23 KB per token in bf16);
        `chat_template=None` picks the model's (SmolLM2's format for SmolLM2, else its own Jinja template);
        `dtype="auto"` is bf16 where the device has bf16 matrix units, else fp32 (agentkiln.hardware);
        beyond `max_waiting` sequences waiting for admission a request gets EngineUnavailable (503)."""
        self.model_name = model_name
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device.type)
        self.max_batch_size = max_batch_size
        if self.device.type == "cpu":
            # Intra-op threads are process-wide; use every core but never oversubscribe.
            torch.set_num_threads(num_threads or max(1, os.cpu_count() or 1))
        self.tokenizer = load_tokenizer(self.model_dir)
        self.chat_template = chat_template or template_for(self.tokenizer, self.model_dir)
        log.info("%s: chat template %s", self.model_dir.name, self.chat_template.name)
        self.weights = WeightSets(load_model(self.model_dir, self.dtype).to(self.device), self.dtype, self.device)
        cfg = self._model.config
        self.max_context: int = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.renderer = PromptRenderer(self.chat_template, self.tokenizer, self.max_context)
        stop_ids = find_stop_ids(self.tokenizer, self._model.generation_config)
        self.grammars = GrammarCache(self.tokenizer, int(cfg.vocab_size), stop_ids)
        self._scheduler = Scheduler(
            self.weights,
            stop_ids=stop_ids,
            pad_id=self._pad_id,
            device=self.device,
            max_batch_size=max_batch_size,
            gather_window_s=gather_window_s,
            prefix_cache=PrefixCache(prefix_cache_tokens, prefix_cache_entries) if prefix_cache_tokens > 0 else None,
            max_waiting=max_waiting,
        )

    # ---- public API -------------------------------------------------------------------------

    @property
    def stats(self) -> EngineStats:
        return self._scheduler.stats

    @property
    def running(self) -> int:
        """Sequences being generated now (cancelled ones leave at the next step)."""
        return self._scheduler.running

    @property
    def waiting(self) -> int:
        """Sequences waiting to join a batch."""
        return self._scheduler.waiting

    @property
    def prefix_cache(self) -> PrefixCache | None:
        return self._scheduler.prefix_cache

    @property
    def model_version(self) -> str:
        return self.weights.main.version

    def version_for(self, agent: str | None) -> str:
        return self.weights.version_for(agent)

    def weights_key(self, agent: str | None, variant: str | None = None) -> str | None:
        return self.weights.key_for(agent, variant)

    @property
    def agent_versions(self) -> dict[str, str]:
        return self.weights.agent_versions

    @property
    def _model(self) -> torch.nn.Module:
        """The main model."""
        return self.weights.main.model

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def render(self, request: ChatRequest) -> RenderedPrompt:
        return self.renderer.render(request)

    async def render_async(self, request: ChatRequest) -> RenderedPrompt:
        return await self.renderer.render_async(request)

    async def chat(self, request: ChatRequest) -> ChatResult:
        loop = asyncio.get_running_loop()
        prompt = await self.render_async(request)
        grammar = await self._grammar(request)
        futures: list[asyncio.Future[SeqOutput]] = [loop.create_future() for _ in range(request.n)]
        seqs = [
            self._make_seq(request, prompt.ids, i, _future_callbacks(loop, fut), grammar)
            for i, fut in enumerate(futures)
        ]
        self._scheduler.submit(seqs)
        try:
            outputs = await asyncio.gather(*futures)
        except BaseException:
            for seq in seqs:
                seq.cancelled = True
            raise
        return self._result(request, prompt, outputs)

    async def chat_stream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        if request.n != 1:
            raise ValueError("streaming supports n == 1 only")
        loop = asyncio.get_running_loop()
        prompt = await self.render_async(request)
        grammar = await self._grammar(request)
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def on_token(tok: int, out: SeqOutput | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("tok", (tok, out)))

        def on_error(exc: BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("err", exc))

        seq = self._make_seq(request, prompt.ids, 0, (on_token, on_error), grammar)
        self._scheduler.submit([seq])
        detok = IncrementalDetokenizer(self.tokenizer)
        visible = self.chat_template.stream_filter(request.stop, bool(request.tools))
        emitted: list[str] = []
        try:
            while True:
                kind, payload = await queue.get()
                if kind == "err":
                    raise payload
                tok, out = payload
                if out is None:
                    delta = visible.feed(detok.add(tok))
                    emitted.append(delta)
                    yield StreamDelta(index=0, text=delta, token_ids=[tok])
                    continue
                final = self._result(request, prompt, [out])
                text, shown = final.choices[0].text, "".join(emitted)
                delta = text[len(shown) :] if text.startswith(shown) else ""
                yield StreamDelta(index=0, text=delta, token_ids=[tok], final=final)
                return
        finally:
            seq.cancelled = True  # no-op when finished; stops generation if the consumer went away

    async def load_weights(self, path: str, version: str, agent: str | None = None) -> None:
        """Apply a peft LoRA adapter (merged into a copy of the base) or load a full checkpoint.

        agent=None replaces the main weights; a name (re)places the weight set served to that agent.
        """

        def swap() -> None:
            self.weights.swap(Path(path), version, agent)
            if self.prefix_cache is not None:
                self.prefix_cache.clear_scope(agent)  # cached KV was computed by the old weights
            self.stats.weight_swaps += 1

        await self._run_task(swap)

    async def unload_weights(self, agent: str) -> None:
        """Drop `agent`'s weight set (no-op if it has none); its calls get the main weights again."""
        if agent is None:
            raise ValueError("the main weights cannot be unloaded")

        def unload() -> None:
            if self.weights.unload(agent) and self.prefix_cache is not None:
                self.prefix_cache.clear_scope(agent)

        await self._run_task(unload)

    async def set_prefix_cache(self, cache: PrefixCache | None) -> None:
        """Replace (None: disable) the prefix cache between batches; the scheduler thread owns it otherwise."""

        def swap() -> None:
            self._scheduler.prefix_cache = cache

        await self._run_task(swap)

    async def close(self) -> None:
        await asyncio.to_thread(self._scheduler.close)
        self.renderer.close()

    # ---- request plumbing ---------------------------------------------------------------------

    async def _run_task(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the scheduler thread once the running batch has drained."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def done(exc: BaseException | None) -> None:
            loop.call_soon_threadsafe(_settle, fut, None, exc)

        self._scheduler.add_task((fn, done))
        await fut

    async def _grammar(self, request: ChatRequest) -> Any:
        """The request's compiled grammar (None: unconstrained), compiled on the render thread."""
        spec = grammar_spec(request)
        if spec is None:
            return None
        return await self.renderer.off_loop(self.grammars.compile, spec)

    def _make_seq(
        self, request: ChatRequest, prompt_ids: list[int], index: int, callbacks: Callbacks, grammar: Any = None
    ) -> Sequence:
        gen = torch.Generator(device="cpu")
        if request.seed is not None:
            gen.manual_seed((request.seed * 1000 + index) % 2**64)  # n samples differ; fits torch's uint64
        else:
            gen.seed()
        stop = [s for s in request.stop if s]
        return Sequence(
            prompt_ids=list(prompt_ids),
            max_tokens=min(request.max_tokens or unlimited_cap(request.n), self.max_context - len(prompt_ids)),
            temperature=request.temperature,
            top_p=request.top_p,
            stop=StopStringMatcher(self.tokenizer, stop) if stop else None,
            generator=gen,
            on_token=callbacks[0],
            on_error=callbacks[1],
            grammar=self.grammars.matcher(grammar) if grammar is not None else None,
            agent=self.weights_key(request.agent, request.variant),
        )

    def _result(self, request: ChatRequest, prompt: RenderedPrompt, outputs: list[SeqOutput]) -> ChatResult:
        choices = build_choices(
            self.tokenizer, self.chat_template, request, [(o.ids, o.logprobs, o.finish_reason) for o in outputs]
        )
        version = outputs[0].model_version if outputs else self.version_for(self.weights_key(request.agent, request.variant))
        return ChatResult(
            prompt_ids=prompt.ids,
            prompt_text=prompt.text,
            choices=choices,
            model=self.model_name,
            model_version=version,
        )


def _settle(fut: asyncio.Future, value: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


def _future_callbacks(loop: asyncio.AbstractEventLoop, fut: asyncio.Future) -> Callbacks:
    def on_token(_tok: int, out: SeqOutput | None) -> None:
        if out is not None:
            loop.call_soon_threadsafe(_settle, fut, out, None)

    def on_error(exc: BaseException) -> None:
        loop.call_soon_threadsafe(_settle, fut, None, exc)

    return on_token, on_error
