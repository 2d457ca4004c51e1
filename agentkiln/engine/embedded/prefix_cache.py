"""Bounded LRU cache of per-sequence KV states keyed by token ids, to skip re-prefilling shared prefixes.

Why it is correct to reuse: with causal attention and absolute positions counted from 0, the
keys/values at positions < k depend only on tokens < k. So for any cached sequence, the KV of
its longest common prefix with a new prompt is exactly the KV that prompt would compute.

Why a linear scan instead of a trie or block hashes: entries are few (tens) and comparing two
id tensors is one vectorised op, and a scan finds partial matches at any token (two prompts that
share only the system prompt) without block alignment. Entries are never mutated: lookups hand
out views that callers must only read (concatenation / padding copies them).

Scopes: KV belongs to the weights that computed it, so an engine serving several weight sets (one
per agent) files each entry under its weight set's name and only matches within that scope; all
scopes share one token/entry budget and one LRU order.

Owned by the engine's scheduler thread; not thread-safe.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

LayerKV = tuple[torch.Tensor, torch.Tensor]  # keys, values: [1, kv_heads, length, head_dim]
Scope = str | None  # the weight set an entry was computed with (None: the main weights)


@dataclass(frozen=True)
class PrefixHit:
    length: int  # number of leading prompt tokens whose KV is reused
    kv: list[LayerKV]  # per layer, views of exactly `length` positions; read-only


@dataclass
class _Entry:
    ids: torch.Tensor  # [n] int64
    kv: list[LayerKV]
    scope: Scope = None


class PrefixCache:
    """Keeps at most `max_entries` sequences and `max_tokens` cached positions, evicting least recently used."""

    def __init__(self, max_tokens: int, max_entries: int = 32) -> None:
        self.max_tokens = max_tokens
        self.max_entries = max_entries
        self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()
        self._next_key = 0
        self.tokens = 0  # positions held now
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop everything (the KV belongs to the weights that computed it)."""
        self._entries.clear()
        self.tokens = 0

    def clear_scope(self, scope: Scope) -> None:
        """Drop the entries of one weight set (after those weights were replaced or unloaded)."""
        for key in [k for k, e in self._entries.items() if e.scope == scope]:
            self._drop(key)

    def match_length(self, ids: Sequence[int], scope: Scope = None) -> int:
        """Longest common prefix of `ids` with any entry of `scope`, without touching recency."""
        best = self._best(_as_tensor(ids), scope)
        return best[1]

    def lookup(self, ids: Sequence[int], limit: int, scope: Scope = None) -> PrefixHit | None:
        """Reusable KV for at most `limit` leading tokens of `ids`; marks the entry as recently used."""
        key, length = self._best(_as_tensor(ids), scope)
        length = min(length, limit)
        if key is None or length <= 0:
            return None
        self._entries.move_to_end(key)
        entry = self._entries[key]
        return PrefixHit(length, [(k[:, :, :length], v[:, :, :length]) for k, v in entry.kv])

    def covers(self, ids: Sequence[int], scope: Scope = None) -> bool:
        """True when some entry of `scope` already holds all of `ids` (inserting them would add nothing)."""
        return len(ids) > 0 and self.match_length(ids, scope) == len(ids)

    def insert(self, ids: Sequence[int], kv: list[LayerKV], scope: Scope = None) -> None:
        """Store KV for exactly `ids` (tensors are kept, so pass copies); entries it extends are dropped."""
        n = len(ids)
        if n == 0 or n > self.max_tokens or self.max_entries <= 0:
            return
        if any(k.shape[2] != n or v.shape[2] != n for k, v in kv):
            raise ValueError(f"KV length does not match the {n} ids")
        new = _as_tensor(ids)
        for key, entry in list(self._entries.items()):
            if entry.scope != scope:
                continue
            m = len(entry.ids)
            if m <= n and torch.equal(entry.ids, new[:m]):
                self._drop(key)  # superseded: the new entry serves every lookup this one could
            elif m > n and torch.equal(entry.ids[:n], new):
                self._entries.move_to_end(key)  # already covered
                return
        self._entries[self._next_key] = _Entry(new, kv, scope)
        self._next_key += 1
        self.tokens += n
        while len(self._entries) > self.max_entries or self.tokens > self.max_tokens:
            self._drop(next(iter(self._entries)))
            self.evictions += 1

    def _drop(self, key: int) -> None:
        self.tokens -= len(self._entries.pop(key).ids)

    def _best(self, query: torch.Tensor, scope: Scope) -> tuple[int | None, int]:
        best_key, best_len = None, 0
        for key, entry in self._entries.items():
            if entry.scope != scope:
                continue
            length = _common_prefix(entry.ids, query)
            if length > best_len:
                best_key, best_len = key, length
        return best_key, best_len


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    return _common_prefix(_as_tensor(a), _as_tensor(b))


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if differ.numel() else n


def _as_tensor(ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    return ids if isinstance(ids, torch.Tensor) else torch.tensor(list(ids), dtype=torch.long)
