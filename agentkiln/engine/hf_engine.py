"""Embedded transformers engine: continuous batching on one scheduler thread, exact ids + logprobs.

Why a hand-written decode loop instead of `model.generate`: RL needs the logprob of each
sampled token under the distribution it was sampled from, every sequence must stop on its
own (EOS, stop strings, max_tokens) and stream, and requests that arrive while a batch runs
should join it between steps rather than wait for the slowest sequence.

Threading: one daemon thread owns the model and does all torch work; asyncio callers get
futures / queues fed through `loop.call_soon_threadsafe`. Weight swaps run on that thread
too, when the running batch has drained, so no sequence mixes two model versions.

Logprobs: for temperature > 0 the recorded value is log_softmax(logits / temperature) at the
sampled token, i.e. under the temperature-scaled distribution *before* top-p truncation
(top-p only renormalises the kept mass; the pre-truncation value is what trainers recompute).
For temperature == 0 (greedy) it is log_softmax(logits) at the argmax.

KV cache layout: one DynamicCache for the running batch, left-padded. Joining sequences are
prefilled separately and their cache is left-padded/concatenated in; finished rows are dropped
and all-padding leading columns trimmed. Position ids are passed explicitly (count of real
tokens) so padding never shifts rotary positions.

Prefix caching: agent calls resend a long shared prefix (system prompt, tool definitions, earlier
turns), and prefilling it dominates CPU time. A bounded LRU `PrefixCache` keeps the KV of recent
prompts (and of finished prompt + response, for the next turn); a joining sequence reuses the KV of
its longest cached prefix and prefills only the rest (at least one token, for the last logits). A
joining group whose members share a prefix not yet cached is prefilled in two waves, so the later
members reuse what the first wave computed. Reused KV sits in the batch cache as
[left padding | cached prefix | padding | suffix] per row: holes are masked and position ids still
count real tokens. A weight swap clears the cached KV of the weights it replaced.

Per-agent weights: besides the main weights the engine can hold one weight set per agent name
(`load_weights(path, version, agent="writer")`: a LoRA adapter merged into its own copy of the base,
~0.3 GB per set for SmolLM2-135M in bf16, so decoding costs no more than with one model). A request
whose `agent` has a set is served by it, any other by the main weights. Each weight set runs its
own continuous batch (own KV cache); one scheduler step decodes every set's batch in turn, so
agents are served concurrently, and `max_batch_size` bounds the sequences of all sets together.
Prefix-cache entries are scoped by weight set, so KV never crosses weights.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from agentkiln.engine.base import ChatChoice, ChatRequest, ChatResult, Engine, StreamDelta
from agentkiln.engine.chat_format import RenderedPrompt, parse_tool_calls, render_prompt, stream_visible_text
from agentkiln.engine.model_files import load_model, load_tokenizer
from agentkiln.engine.prefix_cache import LayerKV, PrefixCache, PrefixHit, Scope, common_prefix_length

log = logging.getLogger(__name__)

_MIN_SHARED_PREFIX = 16  # tokens a joining sequence must gain to wait for the first prefill wave


@dataclass
class EngineStats:
    """Counters for tests, benchmarks and the dashboard."""

    prefills: int = 0  # prefill forward passes (each admits a group of sequences)
    decode_steps: int = 0  # batched one-token forward passes
    sequences: int = 0  # sequences finished
    tokens: int = 0  # tokens generated
    max_active: int = 0  # most sequences decoded together
    weight_swaps: int = 0
    prefill_tokens: int = 0  # prompt tokens run through the model
    prefix_hit_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    prefix_hits: int = 0  # sequences that reused a cached prefix


@dataclass
class SeqOutput:
    ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"
    model_version: str


@dataclass
class _Weights:
    """One served weight set (the main model, or one agent's)."""

    model: torch.nn.Module
    version: str


@dataclass
class _Seq:
    """One sequence being generated; touched only by the scheduler thread after submission."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    generator: torch.Generator
    on_token: Callable[[int, SeqOutput | None], None]  # (token id, output when this token ends it)
    on_error: Callable[[BaseException], None]
    agent: str | None = None  # whose weights to use, if that agent has its own (resolved when admitted)
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finished: bool = False
    cancelled: bool = False


class TransformersEngine(Engine):
    """Serves a causal LM from a local folder (safetensors + tokenizer) with batching and weight swaps."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        model_name: str = "smollm2-135m-instruct",
        dtype: str = "bfloat16",
        max_batch_size: int = 8,
        device: str = "cpu",
        num_threads: int | None = None,
        gather_window_s: float = 0.005,
        prefix_cache_tokens: int = 16_384,
        prefix_cache_entries: int = 32,
    ) -> None:
        """`prefix_cache_tokens=0` disables prefix caching (SmolLM2-135M KV: ~23 KB per token in bf16)."""
        self.model_name = model_name
        self.model_dir = Path(model_dir)
        self.dtype = getattr(torch, dtype)
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.gather_window_s = gather_window_s
        if self.device.type == "cpu":
            # Intra-op threads are process-wide; use every core but never oversubscribe.
            torch.set_num_threads(num_threads or max(1, os.cpu_count() or 1))
        self.tokenizer = load_tokenizer(self.model_dir)
        self._base = load_model(self.model_dir, self.dtype).to(self.device)  # what adapters are merged into
        # None: the main weights; a name: that agent's own. Replaced only on the scheduler thread.
        self._weights: dict[Scope, _Weights] = {None: _Weights(self._base, "base")}
        self.stats = EngineStats()
        self.prefix_cache: PrefixCache | None = (
            PrefixCache(prefix_cache_tokens, prefix_cache_entries) if prefix_cache_tokens > 0 else None
        )
        cfg = self._model.config
        self.max_context: int = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
        self._stop_ids = self._find_stop_ids()
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._cond = threading.Condition()
        self._pending: collections.deque[_Seq] = collections.deque()
        self._tasks: collections.deque[tuple[Callable[[], None], Callable[[BaseException | None], None]]] = (
            collections.deque()
        )
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="kiln-engine", daemon=True)
        self._thread.start()

    # ---- public API -------------------------------------------------------------------------

    @property
    def model_version(self) -> str:
        return self._weights[None].version

    def version_for(self, agent: str | None) -> str:
        return (self._weights.get(agent) or self._weights[None]).version

    @property
    def agent_versions(self) -> dict[str, str]:
        return {name: w.version for name, w in list(self._weights.items()) if name is not None}

    @property
    def _model(self) -> torch.nn.Module:
        """The main model."""
        return self._weights[None].model

    def render(self, request: ChatRequest) -> RenderedPrompt:
        return render_prompt(self.tokenizer, request.messages, request.tools or None)

    async def chat(self, request: ChatRequest) -> ChatResult:
        loop = asyncio.get_running_loop()
        prompt = self.render(request)
        futures: list[asyncio.Future[SeqOutput]] = [loop.create_future() for _ in range(request.n)]
        seqs = [self._make_seq(request, prompt.ids, i, _future_callbacks(loop, fut)) for i, fut in enumerate(futures)]
        self._submit(seqs)
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
        prompt = self.render(request)
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def on_token(tok: int, out: SeqOutput | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("tok", (tok, out)))

        def on_error(exc: BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("err", exc))

        seq = self._make_seq(request, prompt.ids, 0, (on_token, on_error))
        self._submit([seq])
        ids: list[int] = []
        emitted = ""
        tools = bool(request.tools)
        try:
            while True:
                kind, payload = await queue.get()
                if kind == "err":
                    raise payload
                tok, out = payload
                ids.append(tok)
                if out is None:
                    raw = self.tokenizer.decode(ids, skip_special_tokens=True)
                    visible = stream_visible_text(raw, request.stop, tools)
                    delta = visible[len(emitted) :] if visible.startswith(emitted) else ""
                    emitted += delta
                    yield StreamDelta(index=0, text=delta, token_ids=[tok])
                    continue
                final = self._result(request, prompt, [out])
                text = final.choices[0].text
                delta = text[len(emitted) :] if text.startswith(emitted) else ""
                yield StreamDelta(index=0, text=delta, token_ids=[tok], final=final)
                return
        finally:
            seq.cancelled = True  # no-op when finished; stops generation if the consumer went away

    async def load_weights(self, path: str, version: str, agent: str | None = None) -> None:
        """Apply a peft LoRA adapter (merged into a copy of the base) or load a full checkpoint.

        agent=None replaces the main weights; a name (re)places the weight set served to that agent.
        """
        await self._run_task(lambda: self._swap_weights(Path(path), version, agent))

    async def unload_weights(self, agent: str) -> None:
        """Drop `agent`'s weight set (no-op if it has none); its calls get the main weights again."""
        if agent is None:
            raise ValueError("the main weights cannot be unloaded")
        await self._run_task(lambda: self._unload(agent))

    async def set_prefix_cache(self, cache: PrefixCache | None) -> None:
        """Replace (None: disable) the prefix cache between batches; the scheduler thread owns it otherwise."""

        def swap() -> None:
            self.prefix_cache = cache

        await self._run_task(swap)

    async def _run_task(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the scheduler thread once the running batch has drained."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def done(exc: BaseException | None) -> None:
            loop.call_soon_threadsafe(_settle, fut, None, exc)

        with self._cond:
            self._tasks.append((fn, done))
            self._cond.notify_all()
        await fut

    async def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        await asyncio.to_thread(self._thread.join)

    # ---- request plumbing ---------------------------------------------------------------------

    def _make_seq(
        self,
        request: ChatRequest,
        prompt_ids: list[int],
        index: int,
        callbacks: tuple[Callable[[int, SeqOutput | None], None], Callable[[BaseException], None]],
    ) -> _Seq:
        if len(prompt_ids) >= self.max_context:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the model's context is {self.max_context}")
        gen = torch.Generator(device="cpu")
        if request.seed is not None:
            gen.manual_seed(request.seed * 1000 + index)  # n samples of one seeded request differ
        else:
            gen.seed()
        return _Seq(
            prompt_ids=list(prompt_ids),
            max_tokens=min(request.max_tokens, self.max_context - len(prompt_ids)),
            temperature=request.temperature,
            top_p=request.top_p,
            stop=[s for s in request.stop if s],
            generator=gen,
            on_token=callbacks[0],
            on_error=callbacks[1],
            agent=request.agent,
        )

    def _submit(self, seqs: list[_Seq]) -> None:
        with self._cond:
            if self._closing:
                raise RuntimeError("engine is closed")
            self._pending.extend(seqs)
            self._cond.notify_all()

    def _result(self, request: ChatRequest, prompt: RenderedPrompt, outputs: list[SeqOutput]) -> ChatResult:
        choices = []
        for i, out in enumerate(outputs):
            raw = self.tokenizer.decode(out.ids, skip_special_tokens=True)
            text = _cut_at_stop(raw, request.stop)
            parsed = parse_tool_calls(text, request.tools)
            finish = "tool_calls" if parsed.tool_calls else out.finish_reason
            choices.append(
                ChatChoice(
                    index=i,
                    text=parsed.text,
                    raw_text=raw,
                    tool_calls=parsed.tool_calls,
                    finish_reason=finish,
                    response_ids=out.ids,
                    logprobs=out.logprobs,
                    parse_error=parsed.parse_error,
                )
            )
        version = outputs[0].model_version if outputs else self.version_for(request.agent)
        return ChatResult(
            prompt_ids=prompt.ids,
            prompt_text=prompt.text,
            choices=choices,
            model=self.model_name,
            model_version=version,
        )

    def _find_stop_ids(self) -> set[int]:
        ids = set()
        for tok in ("<|im_end|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        eos = self._model.generation_config.eos_token_id if self._model.generation_config else None
        for tid in eos if isinstance(eos, list) else [eos, self.tokenizer.eos_token_id]:
            if tid is not None:
                ids.add(int(tid))
        return ids

    # ---- scheduler thread ---------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._pending or self._tasks or self._closing):
                        self._cond.wait()
                    if self._closing:
                        self._fail_pending(RuntimeError("engine closed"))
                        return
                    task = self._tasks.popleft() if self._tasks else None
                if task is not None:
                    fn, done = task
                    try:
                        fn()
                        done(None)
                    except BaseException as exc:
                        log.exception("engine task (weight swap / cache swap) failed")
                        done(exc)
                    continue
                time.sleep(self.gather_window_s)  # let concurrent callers land in the same prefill
                self._serve()

    def _fail_pending(self, exc: BaseException) -> None:
        while self._pending:
            self._pending.popleft().on_error(exc)
        while self._tasks:
            self._tasks.popleft()[1](exc)

    def _take_pending(self, room: int) -> list[_Seq]:
        with self._cond:
            if self._tasks or self._closing:  # drain the batch first, then swap / stop
                return []
            taken = []
            while self._pending and len(taken) < room:
                seq = self._pending.popleft()
                if not seq.cancelled:
                    taken.append(seq)
            return taken

    def _serve(self) -> None:
        """Run continuous batches (one per weight set) until no sequence is active and none can join."""
        running: dict[Scope, _Running] = {}
        joining: list[_Seq] = []
        try:
            while True:
                joining = self._take_pending(self.max_batch_size - _count(running))
                for scope, group in self._by_weights(joining).items():
                    run = running.get(scope)
                    if run is None:
                        run = running[scope] = _Running(scope, self._weights[scope], self._empty_mask())
                    for wave in self._prefill_waves(group, scope):
                        new_cache, new_mask, last_logits = self._prefill(wave, run)
                        self._sample_and_record(wave, last_logits, run.weights.version)
                        run.join(wave, new_cache, new_mask)
                for scope in list(running):
                    if not self._drop_finished(running[scope]):
                        del running[scope]
                if not running:
                    if not self._has_pending():
                        return
                    continue
                self.stats.max_active = max(self.stats.max_active, _count(running))
                for run in running.values():  # one forward per weight set
                    logits = self._decode_step(run)
                    self._sample_and_record(run.seqs, logits, run.weights.version)
        except BaseException as exc:
            log.exception("generation batch failed")
            active = [seq for run in running.values() for seq in run.seqs]
            for seq in active + [s for s in joining if s not in active]:
                if not seq.finished:
                    seq.finished = True
                    seq.on_error(exc)

    def _empty_mask(self) -> torch.Tensor:
        return torch.zeros((0, 0), dtype=torch.long, device=self.device)

    def _by_weights(self, seqs: list[_Seq]) -> dict[Scope, list[_Seq]]:
        """Group joining sequences by the weight set serving them (agents without their own: main)."""
        groups: dict[Scope, list[_Seq]] = {}
        for seq in seqs:
            groups.setdefault(seq.agent if seq.agent in self._weights else None, []).append(seq)
        return groups

    def _drop_finished(self, run: _Running) -> bool:
        """Remove finished/cancelled rows (caching finished prompt + response first); False when none is left."""
        keep = [i for i, s in enumerate(run.seqs) if not (s.finished or s.cancelled)]
        if len(keep) < len(run.seqs):
            self._remember_finished(run)
            run.seqs = [run.seqs[i] for i in keep]
            if not run.seqs:
                run.cache, run.mask = None, run.mask[:0]
            else:
                assert run.cache is not None
                run.cache, run.mask = _select_rows(run.cache, run.mask, keep)
        return bool(run.seqs)

    def _has_pending(self) -> bool:
        with self._cond:
            return bool(self._pending) and not self._tasks and not self._closing

    def _prefill_waves(self, seqs: list[_Seq], scope: Scope) -> list[list[_Seq]]:
        """Split a joining group so members sharing an uncached prefix with an earlier member wait for it."""
        if self.prefix_cache is None or len(seqs) < 2:
            return [seqs] if seqs else []
        first: list[_Seq] = []
        later: list[_Seq] = []
        for seq in seqs:
            cached = self.prefix_cache.match_length(seq.prompt_ids, scope)
            shared = max((common_prefix_length(seq.prompt_ids, f.prompt_ids) for f in first), default=0)
            shared = min(shared, len(seq.prompt_ids) - 1)
            (later if shared - cached >= _MIN_SHARED_PREFIX else first).append(seq)
        return [wave for wave in (first, later) if wave]

    def _prefill(self, seqs: list[_Seq], run: _Running) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """Prefill each prompt's uncached suffix; returns the batch cache, its mask and the last logits."""
        hits = [self._lookup(seq, run.scope) for seq in seqs]
        past = max((h.length for h in hits if h is not None), default=0)
        suffixes = [seq.prompt_ids[h.length if h else 0 :] for seq, h in zip(seqs, hits)]
        longest = max(len(s) for s in suffixes)
        ids = torch.full((len(seqs), longest), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), past + longest), dtype=torch.long)
        for row, (suffix, hit) in enumerate(zip(suffixes, hits)):
            ids[row, longest - len(suffix) :] = torch.tensor(suffix)
            mask[row, past + longest - len(suffix) :] = 1
            if hit is not None:
                mask[row, past - hit.length : past] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
        cache = _cache_from_hits(hits, past) if past else DynamicCache()
        out = run.weights.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1
        )
        self.stats.prefills += 1
        self.stats.prefill_tokens += sum(len(s) for s in suffixes)
        if self.prefix_cache is not None:
            for row, seq in enumerate(seqs):
                self._remember(seq.prompt_ids, cache, mask, row, run.scope)
        return cache, mask, out.logits[:, -1, :]

    def _lookup(self, seq: _Seq, scope: Scope) -> PrefixHit | None:
        if self.prefix_cache is None:
            return None
        hit = self.prefix_cache.lookup(seq.prompt_ids, limit=len(seq.prompt_ids) - 1, scope=scope)
        if hit is not None:
            self.stats.prefix_hits += 1
            self.stats.prefix_hit_tokens += hit.length
        return hit

    def _remember(self, token_ids: list[int], cache: DynamicCache, mask: torch.Tensor, row: int, scope: Scope) -> None:
        """Copy one row's KV (its real columns) into the prefix cache under `token_ids` and its weight set."""
        assert self.prefix_cache is not None
        if not token_ids or self.prefix_cache.covers(token_ids, scope) or len(token_ids) > self.prefix_cache.max_tokens:
            return
        cols = mask[row].nonzero()[:, 0]
        if len(cols) != len(token_ids):  # a bookkeeping bug; skipping keeps the cache correct
            log.error("not caching row %d: %d positions for %d ids", row, len(cols), len(token_ids))
            return
        kv: list[LayerKV] = [
            (layer.keys[row : row + 1].index_select(2, cols), layer.values[row : row + 1].index_select(2, cols))
            for layer in _layers(cache)
        ]
        self.prefix_cache.insert(token_ids, kv, scope)

    def _remember_finished(self, run: _Running) -> None:
        """Cache prompt + response of finished (not cancelled) sequences: an agent's next turn extends them."""
        if self.prefix_cache is None or run.cache is None:
            return
        for row, seq in enumerate(run.seqs):
            if seq.finished and not seq.cancelled and len(seq.ids) > 1:
                # The last sampled token was never fed to the model, so the cache holds ids[:-1].
                self._remember(seq.prompt_ids + seq.ids[:-1], run.cache, run.mask, row, run.scope)

    def _decode_step(self, run: _Running) -> torch.Tensor:
        """One batched token for every sequence of one weight set; extends its mask by a column."""
        seqs, mask = run.seqs, run.mask
        last = torch.tensor([[s.ids[-1]] for s in seqs], dtype=torch.long, device=self.device)
        positions = mask.sum(-1, keepdim=True)
        run.mask = torch.cat([mask, torch.ones((len(seqs), 1), dtype=mask.dtype, device=self.device)], dim=1)
        out = run.weights.model(input_ids=last, attention_mask=run.mask, position_ids=positions, cache=run.cache)
        self.stats.decode_steps += 1
        return out.logits[:, -1, :]

    def _sample_and_record(self, seqs: list[_Seq], logits: torch.Tensor, version: str) -> None:
        logits = logits.float()
        for row, seq in enumerate(seqs):
            tok, logprob = _sample(logits[row], seq.temperature, seq.top_p, seq.generator)
            seq.ids.append(tok)
            seq.logprobs.append(logprob)
            self.stats.tokens += 1
            finish = None
            if (
                tok in self._stop_ids
                or seq.stop
                and _has_stop(self.tokenizer.decode(seq.ids, skip_special_tokens=True), seq.stop)
            ):
                finish = "stop"
            elif len(seq.ids) >= seq.max_tokens:
                finish = "length"
            out = None
            if finish is not None:
                seq.finished = True
                self.stats.sequences += 1
                out = SeqOutput(
                    ids=list(seq.ids), logprobs=list(seq.logprobs), finish_reason=finish, model_version=version
                )
            if not seq.cancelled:
                seq.on_token(tok, out)

    # ---- weights ------------------------------------------------------------------------------

    def _swap_weights(self, path: Path, version: str, agent: str | None) -> None:
        who = f"agent {agent!r}" if agent is not None else "the main weights"
        if (path / "adapter_config.json").is_file():
            from peft import PeftModel

            log.info("merging LoRA adapter %s into a copy of the base model for %s (version %s)", path, who, version)
            peft_model = PeftModel.from_pretrained(copy.deepcopy(self._base), str(path))
            model = peft_model.merge_and_unload()
        else:
            log.info("loading full weights from %s for %s (version %s)", path, who, version)
            model = load_model(path, self.dtype).to(self.device)
            if agent is None:
                self._base = model  # main full weights become the base later adapters are merged into
        model.eval()
        self._weights[agent] = _Weights(model, version)
        if self.prefix_cache is not None:
            self.prefix_cache.clear_scope(agent)  # cached KV was computed by the old weights
        self.stats.weight_swaps += 1

    def _unload(self, agent: str) -> None:
        if self._weights.pop(agent, None) is not None:
            log.info("agent %r is served the main weights again", agent)
            if self.prefix_cache is not None:
                self.prefix_cache.clear_scope(agent)


@dataclass
class _Running:
    """The continuous batch of one weight set: its sequences and their left-padded KV cache."""

    scope: Scope
    weights: _Weights
    mask: torch.Tensor
    seqs: list[_Seq] = field(default_factory=list)
    cache: DynamicCache | None = None

    def join(self, wave: list[_Seq], cache: DynamicCache, mask: torch.Tensor) -> None:
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:
            self.cache, self.mask = _concat_caches(self.cache, self.mask, cache, mask)
        self.seqs += wave


def _count(running: dict[Scope, _Running]) -> int:
    return sum(len(run.seqs) for run in running.values())


# ---- helpers (pure functions) -----------------------------------------------------------------


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> tuple[int, float]:
    """Sample one token from a float32 [vocab] row; return it and its logprob (see module doc)."""
    if temperature <= 0.0:
        logp = torch.log_softmax(logits, dim=-1)
        tok = int(torch.argmax(logits))
        return tok, float(logp[tok])
    logp = torch.log_softmax(logits / temperature, dim=-1)
    probs = logp.exp()
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_p, dim=-1)
        drop = cumulative - sorted_p >= top_p  # keep the smallest prefix reaching top_p (always >= 1 token)
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_p.cpu(), 1, generator=gen)
        tok = int(order[int(choice)])
    else:
        tok = int(torch.multinomial(probs.cpu(), 1, generator=gen))
    return tok, float(logp[tok])


def _has_stop(text: str, stop: list[str]) -> bool:
    return any(s in text for s in stop)


def _cut_at_stop(text: str, stop: list[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    layers = list(cache.layers)
    if any(type(layer) is not DynamicLayer for layer in layers):
        raise TypeError("continuous batching needs plain DynamicLayer caches")
    return layers


def _cache_from_hits(hits: list[PrefixHit | None], past: int) -> DynamicCache:
    """Batch cache of `past` columns: each row's reused KV right-aligned, zeros (masked) to its left."""
    template = next(h for h in hits if h is not None)
    layers = []
    for i, (k0, v0) in enumerate(template.kv):
        keys, values = [], []
        for hit in hits:
            if hit is None:
                keys.append(k0.new_zeros((1, k0.shape[1], past, k0.shape[3])))
                values.append(v0.new_zeros((1, v0.shape[1], past, v0.shape[3])))
            else:
                k, v = hit.kv[i]
                keys.append(F.pad(k, (0, 0, past - hit.length, 0)))
                values.append(F.pad(v, (0, 0, past - hit.length, 0)))
        layers.append((torch.cat(keys, dim=0), torch.cat(values, dim=0)))
    return DynamicCache(ddp_cache_data=layers)


def _concat_caches(
    a: DynamicCache, mask_a: torch.Tensor, b: DynamicCache, mask_b: torch.Tensor
) -> tuple[DynamicCache, torch.Tensor]:
    """Left-pad the shorter of two batch caches to a common length and stack them along the batch."""
    length = max(mask_a.shape[1], mask_b.shape[1])
    pad_a, pad_b = length - mask_a.shape[1], length - mask_b.shape[1]
    for la, lb in zip(_layers(a), _layers(b)):
        la.keys = torch.cat([F.pad(la.keys, (0, 0, pad_a, 0)), F.pad(lb.keys, (0, 0, pad_b, 0))], dim=0)
        la.values = torch.cat([F.pad(la.values, (0, 0, pad_a, 0)), F.pad(lb.values, (0, 0, pad_b, 0))], dim=0)
    return a, torch.cat([F.pad(mask_a, (pad_a, 0)), F.pad(mask_b, (pad_b, 0))], dim=0)


def _select_rows(cache: DynamicCache, mask: torch.Tensor, rows: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    """Keep only `rows` of the batch, then trim leading columns that are padding for every row."""
    index = torch.tensor(rows, dtype=torch.long, device=mask.device)
    mask = mask.index_select(0, index)
    real = mask.any(dim=0).nonzero()
    start = int(real[0]) if real.numel() else mask.shape[1]
    mask = mask[:, start:]
    for layer in _layers(cache):
        layer.keys = layer.keys.index_select(0, index)[:, :, start:, :]
        layer.values = layer.values.index_select(0, index)[:, :, start:, :]
    return cache, mask


def _settle(fut: asyncio.Future, value: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


def _future_callbacks(
    loop: asyncio.AbstractEventLoop, fut: asyncio.Future
) -> tuple[Callable[[int, SeqOutput | None], None], Callable[[BaseException], None]]:
    def on_token(_tok: int, out: SeqOutput | None) -> None:
        if out is not None:
            loop.call_soon_threadsafe(_settle, fut, out, None)

    def on_error(exc: BaseException) -> None:
        loop.call_soon_threadsafe(_settle, fut, None, exc)

    return on_token, on_error
