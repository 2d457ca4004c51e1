"""Choosing the next token (with the logprob RL needs) and deciding when a sequence stops.

Logprobs: for temperature > 0 the recorded value is log_softmax(logits / temperature) at the
sampled token, i.e. under the temperature-scaled distribution *before* top-p truncation
(top-p only renormalises the kept mass; the pre-truncation value is what trainers recompute).
For temperature == 0 (greedy) it is log_softmax(logits) at the argmax; so is it for temperatures
below `GREEDY_BELOW_TEMPERATURE`, whose scaled logits would overflow float32 (inf/NaN).
"""

from __future__ import annotations

from typing import Any

import torch

from agentkiln.engine.embedded.detokenizer import IncrementalDetokenizer
from agentkiln.engine.limits import GREEDY_BELOW_TEMPERATURE


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> tuple[int, float]:
    """Sample one token from a float32 [vocab] row; return it and its logprob (see module doc)."""
    if temperature < GREEDY_BELOW_TEMPERATURE:
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


def recorded_logprob(logits: torch.Tensor, tok: int, temperature: float) -> float:
    """The logprob `sample` records for `tok` (see module doc), for a token sampled from other logits.

    Constrained decoding samples from grammar-masked logits but records this value of the model's
    own logits: the mask, like top-p, only renormalises the kept mass, and the learner recomputes
    the unmasked quantity, so its ratio starts at 1.
    """
    scaled = logits if temperature < GREEDY_BELOW_TEMPERATURE else logits / temperature
    return float(torch.log_softmax(scaled, dim=-1)[tok])


def find_stop_ids(tokenizer: Any, generation_config: Any) -> set[int]:
    """Token ids that end a sequence: ChatML's end markers (when the vocab has them) and the model's EOS."""
    ids = set()
    for tok in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    eos = generation_config.eos_token_id if generation_config else None
    for tid in eos if isinstance(eos, list) else [eos, tokenizer.eos_token_id]:
        if tid is not None:
            ids.add(int(tid))
    return ids


class StopStringMatcher:
    """Whether the decoded response contains a stop string yet, checking only the text each token changed.

    Equivalent to `any(s in tokenizer.decode(ids) for s in stop)` after every token (that includes
    a not yet complete trailing character), at constant decode work per token.
    """

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.stop = stop
        self._detok = IncrementalDetokenizer(tokenizer)
        self._keep = max(len(s) for s in stop) - 1
        self._tail = ""  # last `_keep` committed characters: a match may start there

    def add(self, token_id: int) -> bool:
        new = self._detok.add(token_id)
        window = self._tail + new + self._detok.pending
        if self._keep:
            self._tail = (self._tail + new)[-self._keep :]
        return any(s in window for s in self.stop)
