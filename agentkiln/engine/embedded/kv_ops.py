"""DynamicCache tensor work for continuous batching: build, join, shrink and copy out batch KV.

Layout: one left-padded cache per running batch, rows = sequences, columns = positions; the
attention mask says which columns are real. Reused prefix KV sits in a row as
[left padding | cached prefix | padding | suffix]: holes are masked, position ids count real tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from agentkiln.engine.embedded.prefix_cache import LayerKV, PrefixHit


def layers(cache: DynamicCache) -> list[DynamicLayer]:
    out = list(cache.layers)
    if any(type(layer) is not DynamicLayer for layer in out):
        raise TypeError("continuous batching needs plain DynamicLayer caches")
    return out


def cache_from_hits(hits: list[PrefixHit | None], past: int) -> DynamicCache:
    """Batch cache of `past` columns: each row's reused KV right-aligned, zeros (masked) to its left."""
    template = next(h for h in hits if h is not None)
    built = []
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
        built.append((torch.cat(keys, dim=0), torch.cat(values, dim=0)))
    return DynamicCache(ddp_cache_data=built)


def concat_caches(
    a: DynamicCache, mask_a: torch.Tensor, b: DynamicCache, mask_b: torch.Tensor
) -> tuple[DynamicCache, torch.Tensor]:
    """Left-pad the shorter of two batch caches to a common length and stack them along the batch."""
    length = max(mask_a.shape[1], mask_b.shape[1])
    pad_a, pad_b = length - mask_a.shape[1], length - mask_b.shape[1]
    for la, lb in zip(layers(a), layers(b)):
        la.keys = torch.cat([F.pad(la.keys, (0, 0, pad_a, 0)), F.pad(lb.keys, (0, 0, pad_b, 0))], dim=0)
        la.values = torch.cat([F.pad(la.values, (0, 0, pad_a, 0)), F.pad(lb.values, (0, 0, pad_b, 0))], dim=0)
    return a, torch.cat([F.pad(mask_a, (pad_a, 0)), F.pad(mask_b, (pad_b, 0))], dim=0)


def select_rows(cache: DynamicCache, mask: torch.Tensor, rows: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    """Keep only `rows` of the batch, then trim leading columns that are padding for every row."""
    index = torch.tensor(rows, dtype=torch.long, device=mask.device)
    mask = mask.index_select(0, index)
    real = mask.any(dim=0).nonzero()
    start = int(real[0]) if real.numel() else mask.shape[1]
    mask = mask[:, start:]
    for layer in layers(cache):
        layer.keys = layer.keys.index_select(0, index)[:, :, start:, :]
        layer.values = layer.values.index_select(0, index)[:, :, start:, :]
    return cache, mask


def row_kv(cache: DynamicCache, row: int, cols: torch.Tensor) -> list[LayerKV]:
    """Copies of one row's KV at the given columns, per layer (what the prefix cache stores)."""
    return [
        (layer.keys[row : row + 1].index_select(2, cols), layer.values[row : row + 1].index_select(2, cols))
        for layer in layers(cache)
    ]
