"""AgentKiln records as TRL datasets, token ids kept exactly as the engine sampled them.

Why token ids and not text: the ids in a span are what the model saw and produced (tool-call
syntax, special tokens, a template the tokenizer may not round-trip); re-tokenizing decoded
text would train on different tokens than were sampled. TRL takes pre-tokenized data for SFT
(`input_ids` + `labels`), for DPO through `prompt_ids` / `chosen_ids` / `rejected_ids` (see
train.py) and for GRPO through its `rollout_func`.

What each algorithm trains on:
* sft: every response token the model generated (`response_mask` 1); the prompt and tool /
  environment tokens of merged turns are labelled -100.
* dpo: (chosen, rejected) answers to the same prompt; a pair whose answer has masked tokens
  inside (a merged multi-turn answer) is dropped, since TRL's DPO loss covers every completion token.
* grpo: GRPO groups are the calls at the same turn (`step`) of the rollouts of one group
  (`group_id`), each call's reward its rollout's return; TRL normalises within the group. TRL
  needs every group to hold `num_generations` completions: the most common size is used and
  groups of another size are dropped with the reason.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from agentkiln.algorithms.dpo.algorithm import PreferencePair
from agentkiln.models import Transition

IGNORE_INDEX = -100  # labels PyTorch's cross-entropy (and TRL) leave out of the loss
GROUP_PROMPT_PREFIX = "kiln-group-"


@dataclass
class Prepared:
    """Rows for a TRL trainer plus what was left out and why."""

    rows: list[dict]
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def trained_on(self) -> int:
        return len(self.rows)


@dataclass
class GRPOGroups:
    """GRPO groups of one size: the dataset rows name a group, `rollout_func` reads its calls."""

    rows: list[dict]
    groups: dict[str, list[Transition]]
    size: int
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def trained_on(self) -> int:
        """Calls trained on (a row is a whole group)."""
        return sum(len(calls) for calls in self.groups.values())


def _mask(t: Transition) -> list[int]:
    return t.response_mask or [1] * len(t.response_ids)


def sft_rows(transitions: Sequence[Transition]) -> Prepared:
    rows, dropped = [], Counter()
    for t in transitions:
        mask = _mask(t)
        if not any(mask):
            dropped["no generated token"] += 1
            continue
        labels = [IGNORE_INDEX] * len(t.prompt_ids) + [tok if m else IGNORE_INDEX for tok, m in zip(t.response_ids, mask)]
        rows.append({"input_ids": list(t.prompt_ids) + list(t.response_ids), "labels": labels})
    return Prepared(rows, dict(dropped))


def dpo_rows(pairs: Sequence[PreferencePair]) -> Prepared:
    rows, dropped = [], Counter()
    for p in pairs:
        if not all(_mask(p.chosen)) or not all(_mask(p.rejected)):
            dropped["answer has tool/environment tokens inside"] += 1
            continue
        row = {"prompt_ids": list(p.chosen.prompt_ids), "chosen_ids": list(p.chosen.response_ids)}
        rows.append({**row, "rejected_ids": list(p.rejected.response_ids)})
    return Prepared(rows, dict(dropped))


def grpo_groups(transitions: Sequence[Transition]) -> GRPOGroups:
    by_key: dict[tuple[str, int], list[Transition]] = defaultdict(list)
    dropped: Counter[str] = Counter()
    for t in transitions:
        if t.group_id is None:
            dropped["no group"] += 1
            continue
        if not all(_mask(t)):
            dropped["answer has tool/environment tokens inside"] += 1
            continue
        by_key[(t.group_id, t.step)].append(t)
    if not by_key:
        return GRPOGroups([], {}, 0, dict(dropped))
    size = Counter(len(v) for v in by_key.values()).most_common(1)[0][0]
    groups: dict[str, list[Transition]] = {}
    for calls in by_key.values():
        if len(calls) != size:
            dropped[f"group of {len(calls)} calls (TRL needs {size} per group)"] += len(calls)
        elif size < 2:
            dropped["group of one call: no advantage"] += 1
        else:
            groups[f"{GROUP_PROMPT_PREFIX}{len(groups)}"] = calls
    return GRPOGroups([{"prompt": key} for key in groups], groups, size, dict(dropped))


def group_rollout(groups: GRPOGroups, prompts: Sequence[str]) -> dict[str, list]:
    """TRL's `rollout_func` output for `prompts` (group keys): the recorded calls, no generation.

    TRL hands a prompt either once per completion (its repeat sampler) or once per group; both
    are served: the k-th time a key is seen gives its k-th call, a key seen once gives them all.
    """
    seen: Counter[str] = Counter(prompts)
    out: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "logprobs": [], "kiln_return": []}
    taken: Counter[str] = Counter()
    for key in prompts:
        if key not in groups.groups:
            raise ValueError(f"rollout_func got prompt {key!r}, which is not a recorded group")
        calls = groups.groups[key]
        chosen = calls if seen[key] == 1 else [calls[taken[key] % len(calls)]]
        taken[key] += 1
        for t in chosen:
            out["prompt_ids"].append(list(t.prompt_ids))
            out["completion_ids"].append(list(t.response_ids))
            out["logprobs"].append(list(t.logprobs))
            out["kiln_return"].append(float(t.return_))
    return out
