"""How a micro-batch is laid out for the learner's forward pass: padding-free tree packing,
with padded rows (optionally one shared prompt) as the fallback.

Why: on CPU every padded position costs a full token of decoder work, and a GRPO group's
prompt is the same for all its completions. Here all sequences of a micro-batch become one
prefix tree (trie) of token positions: a prompt shared by k completions is one trunk, each
completion a branch (completions that start alike share their first tokens too). The trie is
laid out as ONE packed row in depth-first order, position ids = depth, so the linear layers
(most of the cost) see each distinct prefix once and no padding at all.

A causal LM's hidden state at a position depends only on the tokens before it, so a trie node
has the same hidden state as that position in every sequence through it, and its gradient is
the sum of theirs: the loss equals running every sequence in full.

Attention is the only part that needs the structure. A node sees its ancestors and itself.
The trie splits into chains (runs of nodes with one child each, contiguous in depth-first
order); attention runs per chain, batched: queries = the chain's nodes, keys = the path from
the root to the chain's end, causal inside the chain. That costs sum(chain x path) instead of
the packed length squared, so unrelated sequences packed together do not attend across.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

ATTN_NAME = "kiln_tree"
LAYOUT_KWARG = "kiln_tree"
# Above this many attention scores per layer (chains x heads x queries x keys) the chains go
# through SDPA's memory-efficient kernel instead of explicit matmuls. Explicit matmuls are ~40%
# faster on CPU for small shapes but keep the probabilities for the backward pass (~6 bytes a
# score: 2M scores x 30 layers ~ 0.4 GB at the limit).
MATH_MAX_SCORES = 1 << 21


@dataclass
class TreeLayout:
    """One micro-batch as a packed trie; see the module docstring."""

    input_ids: torch.Tensor  # [1, T] token of each node, depth-first order
    position_ids: torch.Tensor  # [1, T] depth of each node
    predictors: list[int]  # per response token (item order): the node whose output predicts it
    q_index: torch.Tensor  # [C, Q] node of each chain's query slot (padding slots repeat node 0)
    k_index: torch.Tensor  # [C, K] node of each chain's key slot: root path, then the chain
    mask: torch.Tensor  # [C, 1, Q, K] bool: slot q may attend to slot k
    out_index: torch.Tensor  # [T] flat [C * Q] slot holding each node's output
    _bias: torch.Tensor | None = None

    @property
    def nodes(self) -> int:
        return int(self.input_ids.shape[1])

    def bias(self) -> torch.Tensor:
        """[C, 1, 1, Q, K] fp32: 0 where the mask allows, else -inf (added to the scores); built once."""
        if self._bias is None:
            bias = torch.zeros(self.mask.shape, device=self.mask.device)
            self._bias = bias.masked_fill_(~self.mask, float("-inf")).unsqueeze(1)
        return self._bias

    def to(self, device: torch.device) -> TreeLayout:
        return _moved(self, device)


def build_tree(seqs: Sequence[Sequence[int]], prompt_lens: Sequence[int], share: bool = True) -> TreeLayout:
    """Pack sequences (prompt + response ids) into a trie layout.

    The input of a sequence is ids[:-1]; response token j (0-based) of sequence i is
    predicted by the node of prefix ids[:prompt_len + j]. share=False gives every sequence
    its own branch from the root (padding-free packing without prefix sharing).
    """
    token: list[int] = []
    parent: list[int] = []
    children: list[list[int]] = []
    roots: list[int] = []
    index: dict[tuple[int, int], int] = {}
    paths: list[list[int]] = []
    for seq in seqs:
        node, path = -1, []
        for tok in seq[:-1]:
            nxt = index.get((node, tok)) if share else None
            if nxt is None:
                nxt = len(token)
                token.append(tok)
                parent.append(node)
                children.append([])
                (children[node] if node >= 0 else roots).append(nxt)
                if share:
                    index[(node, tok)] = nxt
            node = nxt
            path.append(node)
        paths.append(path)

    # Depth-first order: every subtree, and so every chain, is contiguous.
    order: list[int] = []
    stack = list(reversed(roots))
    while stack:
        n = stack.pop()
        order.append(n)
        stack.extend(reversed(children[n]))
    rank = [0] * len(order)
    for i, n in enumerate(order):
        rank[n] = i

    depth = [0] * len(order)
    chain_of = [0] * len(order)
    starts: list[int] = []  # first node of each chain
    for i, n in enumerate(order):
        p = parent[n]
        if p >= 0:
            depth[i] = depth[rank[p]] + 1
            if len(children[p]) == 1:
                chain_of[i] = chain_of[i - 1]  # the only child follows its parent directly
                continue
        chain_of[i] = len(starts)
        starts.append(i)
    ends = starts[1:] + [len(order)]
    # A chain's parent ends its own chain (it has several children), so the root path of a
    # chain is its parent chain's keys followed by the chain itself.
    keys: list[list[int]] = []
    for first, end in zip(starts, ends):
        p = parent[order[first]]
        keys.append((keys[chain_of[rank[p]]] if p >= 0 else []) + list(range(first, end)))
    chains = list(zip(starts, ends, keys))

    q_len = max(end - first for first, end, _ in chains)
    k_len = max(len(k) for _, _, k in chains)
    q_index = torch.zeros((len(chains), q_len), dtype=torch.long)
    k_index = torch.zeros((len(chains), k_len), dtype=torch.long)
    out_index = torch.empty(len(order), dtype=torch.long)
    for c, (first, end, k) in enumerate(chains):
        q_index[c, : end - first] = torch.arange(first, end)
        k_index[c, : len(k)] = torch.tensor(k, dtype=torch.long)
        out_index[first:end] = c * q_len + torch.arange(end - first)
    # Query slot i of chain c is node first + i at depth anc + i: it sees key slots j <= anc + i
    # (the root path, then itself causally); key padding (j >= len(keys)) is never visible.
    anc = torch.tensor([depth[first] for first in starts])[:, None, None]
    k_count = torch.tensor([len(k) for k in keys])[:, None, None]
    j = torch.arange(k_len)[None, None, :]
    mask = (j <= anc + torch.arange(q_len)[None, :, None]) & (j < k_count)

    predictors: list[int] = []
    for seq, p_len, path in zip(seqs, prompt_lens, paths):
        predictors.extend(rank[path[t]] for t in range(p_len - 1, len(seq) - 1))
    return TreeLayout(
        input_ids=torch.tensor([[token[n] for n in order]], dtype=torch.long),
        position_ids=torch.tensor([depth], dtype=torch.long),
        predictors=predictors,
        q_index=q_index,
        k_index=k_index,
        mask=mask.unsqueeze(1),
        out_index=out_index,
    )


def tree_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: per-chain attention for a packed trie, else plain SDPA.

    query [1, H, T, D], key/value [1, KV, T, D] (grouped-query heads are folded into the query
    length, so keys and values are never repeated). Returns [1, T, H, D] like SDPA's.
    """
    layout: TreeLayout | None = kwargs.pop(LAYOUT_KWARG, None)
    if layout is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[-1]
    rep = heads // kv_heads
    chains, q_len = layout.q_index.shape
    k_len = layout.k_index.shape[1]
    scale = scaling if scaling is not None else 1.0 / math.sqrt(dim)
    # [H, T, D] -> [C, KV, rep * Q, D]; keys/values [KV, T, D] -> [C, KV, K, D]. index_select:
    # its backward (index_add) is several times faster than advanced indexing's on CPU.
    q = query[0].index_select(1, layout.q_index.flatten()).view(kv_heads, rep, chains, q_len, dim)
    q = q.permute(2, 0, 1, 3, 4).reshape(chains, kv_heads, rep * q_len, dim)
    k = key[0].index_select(1, layout.k_index.flatten()).view(kv_heads, chains, k_len, dim).transpose(0, 1)
    v = value[0].index_select(1, layout.k_index.flatten()).view(kv_heads, chains, k_len, dim).transpose(0, 1)
    if chains * heads * q_len * k_len <= MATH_MAX_SCORES:
        scores = torch.matmul(q * scale, k.transpose(-1, -2)).view(chains, kv_heads, rep, q_len, k_len)
        scores = torch.add(scores, layout.bias())  # fp32 from here (bf16 + fp32 promotes in one pass)
        probs = torch.softmax(scores, dim=-1).view(chains, kv_heads, rep * q_len, k_len)
        if dropout > 0.0:
            probs = F.dropout(probs, p=dropout, training=True)
        out = torch.matmul(probs.to(v.dtype), v)
    else:
        mask = layout.mask.expand(chains, 1, q_len, k_len).repeat(1, 1, rep, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
    # [C, KV, rep * Q, D] -> [C * Q, H, D] -> the packed nodes [1, T, H, D]
    out = out.view(chains, heads, q_len, dim).transpose(1, 2).reshape(chains * q_len, heads, dim)
    return out.index_select(0, layout.out_index).unsqueeze(0), None


def enable_tree_attention(model: torch.nn.Module) -> bool:
    """Route the model's attention through `tree_attention`; False when the model cannot use it.

    Only models on SDPA without sliding windows are switched: anything else keeps its own
    attention and the learner uses the padded layouts. Calls without a layout behave as SDPA.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", ATTN_NAME):
        return False
    if (
        getattr(config, "sliding_window", None)
        or getattr(config, "layer_types", None)
        and any(t != "full_attention" for t in config.layer_types)
    ):
        return False
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTN_NAME, tree_attention)
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
        model.set_attn_implementation(ATTN_NAME)
    except (ImportError, AttributeError, TypeError, ValueError) as e:  # a transformers without these hooks
        log.info("tree packing disabled: cannot register the attention function (%s)", e)
        return False
    return True


# --------------------------------------------------------------------------- micro-batches


def _moved(obj, device: torch.device):
    """A copy of dataclass `obj` with its tensors on `device` (itself when already there)."""
    moves = {
        f.name: v.to(device, non_blocking=True)
        for f in fields(obj)
        if isinstance(v := getattr(obj, f.name), torch.Tensor) and v.device != device
    }
    return replace(obj, **moves) if moves else obj


@dataclass
class Item:
    """One transition prepared for batching."""

    ids: list[int]  # prompt + response
    prompt_len: int
    old_logprobs: list[float]
    mask: list[float]
    advantage: float
    temperature: float | None = None  # the log-prob temperature of its call (None: the objective's)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] (each sequence without its last token)
    attention_mask: torch.Tensor
    rows: torch.Tensor  # [N] batch row of each response token
    positions: torch.Tensor  # [N] position whose output predicts it
    targets: torch.Tensor  # [N] the response token ids
    old_logprobs: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor  # [N] (per-rollout advantage repeated per token)
    lengths: list[int]  # response length per row, to split [N] back per sequence
    tokens: int = 0  # prompt + response tokens of all rows (what "tokens/s" counts)
    prefix_ids: torch.Tensor | None = None  # [1, P] prompt shared by every row; input_ids then hold responses
    layout: TreeLayout | None = None  # tree-packed: input_ids etc. live in the layout, rows are all 0
    items: Sequence[Item] = ()  # what it was built from (to fall back to a padded layout)
    temperatures: torch.Tensor | None = None  # [N] per-token call temperature, NaN: not recorded (None: none was)

    def to(self, device: torch.device) -> Batch:
        batch = _moved(self, device)
        if batch.layout is not None and batch.layout.input_ids.device != device:
            batch = replace(batch, layout=batch.layout.to(device))
        return batch


def collate(items: Sequence[Item], pad_id: int, share: bool = False, pack: bool = True) -> Batch:
    """Batch tensors of a micro-batch: tree-packed (pack), else padded rows (share: the prompt once)."""
    if pack:
        layout = build_tree([it.ids for it in items], [it.prompt_len for it in items], share)
        empty = torch.empty((0, 0), dtype=torch.long)
        batch = _batch(items, empty, empty, [0] * len(layout.predictors), layout.predictors)
        batch.layout, batch.items = layout, items
        return batch
    if share and len(items) > 1 and all(it.prompt_len == items[0].prompt_len for it in items):
        p = items[0].prompt_len
        if all(it.ids[:p] == items[0].ids[:p] for it in items):
            return _collate_shared(items, pad_id)
    width = max(len(it.ids) - 1 for it in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    rows: list[int] = []
    positions: list[int] = []
    for b, it in enumerate(items):
        seq = it.ids[:-1]
        input_ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[b, : len(seq)] = 1
        n = len(it.ids) - it.prompt_len
        rows.extend([b] * n)
        positions.extend(range(it.prompt_len - 1, it.prompt_len - 1 + n))
    return _batch(items, input_ids, attention, rows, positions)


def _batch(
    items: Sequence[Item],
    input_ids: torch.Tensor,
    attention: torch.Tensor,
    rows: list[int],
    positions: list[int],
    prefix_ids: torch.Tensor | None = None,
) -> Batch:
    """The per-token tensors both layouts share, in item order."""
    targets: list[int] = []
    old: list[float] = []
    mask: list[float] = []
    adv: list[float] = []
    lengths: list[int] = []
    for it in items:
        n = len(it.ids) - it.prompt_len
        targets.extend(it.ids[it.prompt_len :])
        old.extend(it.old_logprobs)
        mask.extend(it.mask)
        adv.extend([it.advantage] * n)
        lengths.append(n)
    temps = None
    if any(it.temperature is not None for it in items):
        nan = float("nan")
        per_token = [it.temperature if it.temperature is not None else nan for it in items]
        temps = torch.tensor([t for t, n in zip(per_token, lengths) for _ in range(n)], dtype=torch.float32)
    return Batch(
        temperatures=temps,
        input_ids=input_ids,
        attention_mask=attention,
        rows=torch.tensor(rows, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        old_logprobs=torch.tensor(old, dtype=torch.float32),
        mask=torch.tensor(mask, dtype=torch.float32),
        advantages=torch.tensor(adv, dtype=torch.float32),
        lengths=lengths,
        tokens=sum(len(it.ids) for it in items),
        prefix_ids=prefix_ids,
    )


def _collate_shared(items: Sequence[Item], pad_id: int) -> Batch:
    """Rows share one prompt: it is run once and its KV cache repeated, the rows carry only responses.

    Hidden-state index j of a row predicts response token j: index 0 is the prompt's last
    position (shared), index j > 0 is the row's response token j - 1.
    """
    p = items[0].prompt_len
    width = max(len(it.ids) - p - 1 for it in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    rows: list[int] = []
    positions: list[int] = []
    for b, it in enumerate(items):
        resp = it.ids[p:]
        n = len(resp)
        input_ids[b, : n - 1] = torch.tensor(resp[:-1], dtype=torch.long)
        attention[b, : n - 1] = 1
        rows.extend([b] * n)
        positions.extend(range(n))
    return _batch(items, input_ids, attention, rows, positions, torch.tensor([items[0].ids[:p]], dtype=torch.long))
