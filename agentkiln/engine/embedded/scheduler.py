"""The scheduler thread: admits pending sequences, runs continuous batches, finishes sequences.

Why a hand-written decode loop instead of `model.generate`: every sequence must stop on its own
(EOS, stop strings, max_tokens) and stream, and requests that arrive while a batch runs should
join it between steps rather than wait for the slowest sequence.

One daemon thread owns the models and does all torch work. Tasks (weight swaps, cache swaps) run
on it once the running batches have drained. Each weight set runs its own continuous batch (own
KV cache); one step decodes every set's batch in turn, so agents are served concurrently, and
`max_batch_size` bounds the sequences of all sets together.

Prefix caching: agent calls resend a long shared prefix, and prefilling it dominates CPU time. A
joining sequence reuses the KV of its longest cached prefix and prefills only the rest (at least
one token, for the last logits). A joining group whose members share a prefix not yet cached is
prefilled in two waves, so the later members reuse what the first wave computed. Finished
prompt + response are cached too, for the agent's next turn. Entries are scoped by weight set.

Robustness: at most `max_waiting` sequences wait to be admitted (beyond that `submit` raises
EngineUnavailable, a 503 + Retry-After), and a sequence whose sampling, stop matching or
callback fails (or whose prefill fails on its own) errors alone while its batch goes on.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from agentkiln.engine.embedded import kv_ops
from agentkiln.engine.embedded.prefix_cache import PrefixCache, PrefixHit, Scope, common_prefix_length
from agentkiln.engine.embedded.sampler import recorded_logprob, sample
from agentkiln.engine.embedded.sequence import SeqOutput, Sequence
from agentkiln.engine.embedded.weights import WeightSet, WeightSets
from agentkiln.engine.errors import EngineError, EngineUnavailable

log = logging.getLogger(__name__)

_MIN_SHARED_PREFIX = 16  # tokens a joining sequence must gain to wait for the first prefill wave

Task = tuple[Callable[[], None], Callable[[BaseException | None], None]]  # (work, done callback)


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
class RunningBatch:
    """The continuous batch of one weight set: its sequences and their left-padded KV cache."""

    scope: Scope
    weights: WeightSet
    mask: torch.Tensor
    seqs: list[Sequence] = field(default_factory=list)
    cache: DynamicCache | None = None

    def join(self, wave: list[Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:
            self.cache, self.mask = kv_ops.concat_caches(self.cache, self.mask, cache, mask)
        self.seqs += wave


def _count(running: dict[Scope, RunningBatch]) -> int:
    return sum(len(run.seqs) for run in running.values())


class Scheduler:
    """Owns the generation thread; `submit` and `add_task` are its only thread-safe entry points."""

    def __init__(
        self,
        weights: WeightSets,
        *,
        stop_ids: set[int],
        pad_id: int,
        device: torch.device,
        max_batch_size: int,
        gather_window_s: float,
        prefix_cache: PrefixCache | None,
        max_waiting: int = 256,
        retry_after_s: float = 1.0,
    ) -> None:
        self.weights = weights
        self.stop_ids = stop_ids
        self.pad_id = pad_id
        self.device = device
        self.max_batch_size = max_batch_size
        self.gather_window_s = gather_window_s
        self.prefix_cache = prefix_cache  # replaced only by a task, i.e. on this thread
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        self.stats = EngineStats()
        self.running = 0  # sequences in the running batches (written by this thread only)
        self._cond = threading.Condition()
        self._pending: collections.deque[Sequence] = collections.deque()
        self._tasks: collections.deque[Task] = collections.deque()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="kiln-engine", daemon=True)
        self._thread.start()

    # ---- any thread ---------------------------------------------------------------------------

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences for admission; EngineUnavailable when closed or `max_waiting` already wait."""
        with self._cond:
            if self._closing:
                raise EngineUnavailable("engine is closed")
            if len(self._pending) >= self.max_waiting:
                self._pending = collections.deque(s for s in self._pending if not s.cancelled)
                if len(self._pending) >= self.max_waiting:
                    raise EngineUnavailable(
                        f"engine is overloaded: {len(self._pending)} sequences are waiting (limit {self.max_waiting})",
                        retry_after_s=self.retry_after_s,
                    )
            self._pending.extend(seqs)
            self._cond.notify_all()

    @property
    def waiting(self) -> int:
        """Sequences submitted and not yet admitted (cancelled ones included until skipped)."""
        with self._cond:
            return len(self._pending)

    def add_task(self, task: Task) -> None:
        """Queue work for this thread, run once the running batch has drained."""
        with self._cond:
            self._tasks.append(task)
            self._cond.notify_all()

    def close(self) -> None:
        """Fail what is still pending and stop the thread (blocks until it has)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()

    # ---- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._pending or self._tasks or self._closing):
                        self._cond.wait()
                    if self._closing:
                        self._fail_pending(EngineUnavailable("engine closed"))
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

    def _take_pending(self, room: int) -> list[Sequence]:
        with self._cond:
            if self._tasks or self._closing:  # drain the batch first, then swap / stop
                return []
            taken = []
            while self._pending and len(taken) < room:
                seq = self._pending.popleft()
                if not seq.cancelled:
                    taken.append(seq)
            return taken

    def _has_pending(self) -> bool:
        with self._cond:
            return bool(self._pending) and not self._tasks and not self._closing

    def _serve(self) -> None:
        """Run continuous batches (one per weight set) until no sequence is active and none can join."""
        running: dict[Scope, RunningBatch] = {}
        joining: list[Sequence] = []
        try:
            while True:
                joining = self._take_pending(self.max_batch_size - _count(running))
                for scope, group in self._by_weights(joining).items():
                    run = running.get(scope)
                    if run is None:
                        run = running[scope] = RunningBatch(scope, self.weights.sets[scope], self._empty_mask())
                    for wave in self._prefill_waves(group, scope):
                        self._admit(wave, run)
                for scope in list(running):
                    if not self._drop_finished(running[scope]):
                        del running[scope]
                self.running = _count(running)
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
                    self._fail(seq, exc)
        finally:
            self.running = 0

    def _admit(self, wave: list[Sequence], run: RunningBatch) -> None:
        """Prefill a wave and join it to its batch; if that fails, each member is retried alone."""
        try:
            new_cache, new_mask, last_logits = self._prefill(wave, run)
        except Exception as exc:
            if len(wave) == 1:
                log.exception("prefill of one sequence failed")
                self._fail(wave[0], exc)
                return
            log.warning("prefill of a wave of %d failed (%s); admitting them one by one", len(wave), exc)
            for seq in wave:
                self._admit([seq], run)
            return
        self._sample_and_record(wave, last_logits, run.weights.version)
        run.join(wave, new_cache, new_mask)

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        """End one sequence with an error (its row is dropped, never cached); a dead callback is ignored."""
        seq.finished = seq.cancelled = True
        err = exc if isinstance(exc, EngineError) else EngineError(f"generation failed: {type(exc).__name__}: {exc}")
        try:
            seq.on_error(err)
        except Exception:
            log.debug("error callback failed", exc_info=True)

    def _empty_mask(self) -> torch.Tensor:
        return torch.zeros((0, 0), dtype=torch.long, device=self.device)

    def _by_weights(self, seqs: list[Sequence]) -> dict[Scope, list[Sequence]]:
        """Group joining sequences by the weight set serving them (agents without their own: main)."""
        groups: dict[Scope, list[Sequence]] = {}
        for seq in seqs:
            groups.setdefault(self.weights.scope_for(seq.agent), []).append(seq)
        return groups

    def _drop_finished(self, run: RunningBatch) -> bool:
        """Remove finished/cancelled rows (caching finished prompt + response first); False when none is left."""
        keep = [i for i, s in enumerate(run.seqs) if not (s.finished or s.cancelled)]
        if len(keep) < len(run.seqs):
            self._remember_finished(run)
            run.seqs = [run.seqs[i] for i in keep]
            if not run.seqs:
                run.cache, run.mask = None, run.mask[:0]
            else:
                assert run.cache is not None
                run.cache, run.mask = kv_ops.select_rows(run.cache, run.mask, keep)
        return bool(run.seqs)

    # ---- prefill (with prefix reuse) --------------------------------------------------------------

    def _prefill_waves(self, seqs: list[Sequence], scope: Scope) -> list[list[Sequence]]:
        """Split a joining group so members sharing an uncached prefix with an earlier member wait for it."""
        if self.prefix_cache is None or len(seqs) < 2:
            return [seqs] if seqs else []
        first: list[Sequence] = []
        later: list[Sequence] = []
        for seq in seqs:
            cached = self.prefix_cache.match_length(seq.prompt_ids, scope)
            shared = max((common_prefix_length(seq.prompt_ids, f.prompt_ids) for f in first), default=0)
            shared = min(shared, len(seq.prompt_ids) - 1)
            (later if shared - cached >= _MIN_SHARED_PREFIX else first).append(seq)
        return [wave for wave in (first, later) if wave]

    def _prefill(self, seqs: list[Sequence], run: RunningBatch) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """Prefill each prompt's uncached suffix; returns the batch cache, its mask and the last logits."""
        hits = [self._lookup(seq, run.scope) for seq in seqs]
        past = max((h.length for h in hits if h is not None), default=0)
        suffixes = [seq.prompt_ids[h.length if h else 0 :] for seq, h in zip(seqs, hits)]
        longest = max(len(s) for s in suffixes)
        ids = torch.full((len(seqs), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), past + longest), dtype=torch.long)
        for row, (suffix, hit) in enumerate(zip(suffixes, hits)):
            ids[row, longest - len(suffix) :] = torch.tensor(suffix)
            mask[row, past + longest - len(suffix) :] = 1
            if hit is not None:
                mask[row, past - hit.length : past] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
        cache = kv_ops.cache_from_hits(hits, past) if past else DynamicCache()
        out = run.weights.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1
        )
        self.stats.prefills += 1
        self.stats.prefill_tokens += sum(len(s) for s in suffixes)
        if self.prefix_cache is not None:
            for row, seq in enumerate(seqs):
                self._remember(seq.prompt_ids, cache, mask, row, run.scope)
        return cache, mask, out.logits[:, -1, :]

    def _lookup(self, seq: Sequence, scope: Scope) -> PrefixHit | None:
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
        self.prefix_cache.insert(token_ids, kv_ops.row_kv(cache, row, cols), scope)

    def _remember_finished(self, run: RunningBatch) -> None:
        """Cache prompt + response of finished (not cancelled) sequences: an agent's next turn extends them."""
        if self.prefix_cache is None or run.cache is None:
            return
        for row, seq in enumerate(run.seqs):
            if seq.finished and not seq.cancelled and len(seq.ids) > 1:
                # The last sampled token was never fed to the model, so the cache holds ids[:-1].
                self._remember(seq.prompt_ids + seq.ids[:-1], run.cache, run.mask, row, run.scope)

    # ---- decode -----------------------------------------------------------------------------------

    def _decode_step(self, run: RunningBatch) -> torch.Tensor:
        """One batched token for every sequence of one weight set; extends its mask by a column."""
        seqs, mask = run.seqs, run.mask
        last = torch.tensor([[s.ids[-1]] for s in seqs], dtype=torch.long, device=self.device)
        positions = mask.sum(-1, keepdim=True)
        run.mask = torch.cat([mask, torch.ones((len(seqs), 1), dtype=mask.dtype, device=self.device)], dim=1)
        out = run.weights.model(input_ids=last, attention_mask=run.mask, position_ids=positions, cache=run.cache)
        self.stats.decode_steps += 1
        return out.logits[:, -1, :]

    def _sample_and_record(self, seqs: list[Sequence], logits: torch.Tensor, version: str) -> None:
        logits = logits.float()
        for row, seq in enumerate(seqs):
            if seq.finished:  # failed alone during admission; its row goes at the next drop
                continue
            try:
                self._advance(seq, logits[row], version)
            except Exception as exc:
                log.exception("sequence failed; its batch goes on")
                self._fail(seq, exc)

    def _advance(self, seq: Sequence, logits: torch.Tensor, version: str) -> None:
        """Sample one token for `seq`, decide whether it finished, and tell its caller.

        A constrained sequence samples from its grammar-masked logits but records the logprob of
        the model's own logits (sampler.recorded_logprob); it ends when its grammar is complete.
        """
        if seq.grammar is None:
            tok, logprob = sample(logits, seq.temperature, seq.top_p, seq.generator)
        else:
            tok, _ = sample(seq.grammar.mask(logits), seq.temperature, seq.top_p, seq.generator)
            logprob = recorded_logprob(logits, tok, seq.temperature)
            if tok not in self.stop_ids:
                seq.grammar.accept(tok)
        seq.ids.append(tok)
        seq.logprobs.append(logprob)
        self.stats.tokens += 1
        finish = None
        stop_string = seq.stop is not None and seq.stop.add(tok)  # fed every token: it decodes incrementally
        if tok in self.stop_ids or stop_string or (seq.grammar is not None and seq.grammar.done):
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
