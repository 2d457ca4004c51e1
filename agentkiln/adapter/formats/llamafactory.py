"""Export runs as LLaMA-Factory datasets: sharegpt conversations with tool calls, preference pairs, dataset_info.json.

The layout is LLaMA-Factory's `data/README.md` (sharegpt format) as its
`src/llamafactory/data/converter.py` (`SharegptDatasetConverter`) reads it: `conversations`
of {from, value} turns where human/observation stand at even positions and gpt/function_call
at odd ones (anything else is skipped there as "abnormal", so it is left out here, with the
reason), `system`, and `tools` as a JSON string of function schemas. A tool call is a
`function_call` turn whose value is `{"name", "arguments": {...}}` (a list for parallel calls),
the arguments as an object, as in `data/glaive_toolcall_en_demo.json`
(`formatter.FunctionFormatter` JSON-encodes them again); an assistant's text beside its tool
calls is dropped, as LLaMA-Factory's own OpenAI converter does. Tool results in a row are one
`observation` turn joined the way that converter joins them.

Text, not tokens: LLaMA-Factory applies its own chat template, so the recorded messages are
exported, not the token ids. One conversation per call whose history no later call of the
rollout continues (an agent's calls each repeat the chat so far; only the last one is kept).

Pairs (`pairs="group"`): rollouts of one group (the same task) whose rewards differ by more
than `pair_margin` are compared turn by turn; where they first differ at a model turn, the
shared turns are the prompt and the better rollout's turn is `chosen` (ranking dataset).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agentkiln.adapter.formats.chat import RunCalls, reply_message, request_messages, request_tools, text_of
from agentkiln.protocol import LLMCall

log = logging.getLogger(__name__)

DATASET_INFO = "dataset_info.json"
OBSERVATION_JOIN = "\n</tool_response>\n<tool_response>\n"  # converter.py OpenAIDatasetConverter
ASSISTANT_SIDE = ("gpt", "function_call")
USER_SIDE = ("human", "observation")
Role = Literal["human", "gpt", "function_call", "observation"]


class ShareGPTTurn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: Role = Field(alias="from")
    value: str


class ShareGPTExample(BaseModel):
    """One row of the SFT file (`formatting: sharegpt`)."""

    model_config = ConfigDict(extra="forbid")

    conversations: list[ShareGPTTurn]
    system: str = ""
    tools: str = ""


class PreferenceExample(ShareGPTExample):
    """One row of the pairs file (`ranking: true`): the prompt turns end on the user side."""

    chosen: ShareGPTTurn
    rejected: ShareGPTTurn


@dataclass
class LlamaFactoryExport:
    sft: int
    pairs: int
    files: list[str]
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass
class _Conversation:
    run: RunCalls
    example: ShareGPTExample


def _function_call(calls: list[Any]) -> str:
    out = []
    for tc in calls:
        fn = tc.get("function", {}) if isinstance(tc, dict) else {}
        args = fn.get("arguments", "")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except json.JSONDecodeError:
            pass  # not JSON: kept as the text the model wrote
        out.append({"name": fn.get("name", ""), "arguments": args})
    return json.dumps(out[0] if len(out) == 1 else out, ensure_ascii=False)


def _turn(message: dict[str, Any]) -> ShareGPTTurn | str:
    role = message.get("role")
    if role == "user":
        return ShareGPTTurn(from_="human", value=text_of(message.get("content")))
    if role == "assistant":
        if message.get("tool_calls"):
            return ShareGPTTurn(from_="function_call", value=_function_call(message["tool_calls"]))
        return ShareGPTTurn(from_="gpt", value=text_of(message.get("content")))
    if role == "tool":
        return ShareGPTTurn(from_="observation", value=text_of(message.get("content")))
    return "system_midway" if role in ("system", "developer") else "unknown_role"


def conversation(messages: Sequence[dict[str, Any]]) -> tuple[str, list[ShareGPTTurn]] | str:
    """The system text and the alternating turns of `messages`; a string says why they cannot be."""
    i = 0
    system: list[str] = []
    while i < len(messages) and messages[i].get("role") in ("system", "developer"):
        system.append(text_of(messages[i].get("content")))
        i += 1
    turns: list[ShareGPTTurn] = []
    for message in messages[i:]:
        turn = _turn(message)
        if isinstance(turn, str):
            return turn
        last = turns[-1] if turns else None
        if last is not None and last.from_ == turn.from_ and turn.from_ in ("human", "observation", "gpt"):
            sep = OBSERVATION_JOIN if turn.from_ == "observation" else "\n"
            turns[-1] = ShareGPTTurn(from_=turn.from_, value=last.value + sep + turn.value)
            continue
        turns.append(turn)
    for k, turn in enumerate(turns):
        if turn.from_ not in (USER_SIDE if k % 2 == 0 else ASSISTANT_SIDE):
            return "roles_not_alternating"
    return "\n\n".join(system), turns


def _tools(call: LLMCall) -> str:
    tools = [t.get("function", t) if t.get("type") == "function" else t for t in request_tools(call)]
    return json.dumps(tools, ensure_ascii=False) if tools else ""


def conversations(runs: Sequence[RunCalls], skipped: Counter[str]) -> list[_Conversation]:
    """Each rollout's calls that no later call continues, as sharegpt examples (reasons counted in `skipped`)."""
    out: list[_Conversation] = []
    for run in runs:
        full: list[tuple[str, list[ShareGPTTurn], str] | None] = []
        for call in run.calls:
            reply = reply_message(call)
            if reply is None:
                skipped["no_reply"] += 1
                full.append(None)
                continue
            parsed = conversation([*request_messages(call), reply])
            if isinstance(parsed, str):
                skipped[parsed] += 1
                full.append(None)
                continue
            full.append((parsed[0], parsed[1], _tools(call)))
        for i, item in enumerate(full):
            if item is None:
                continue
            system, turns, tools = item
            if any(
                later is not None and later[0] == system and later[1][: len(turns)] == turns for later in full[i + 1 :]
            ):
                continue  # a later call carries this whole conversation on
            out.append(_Conversation(run, ShareGPTExample(conversations=turns, system=system, tools=tools)))
    return out


def group_pairs(
    convs: Sequence[_Conversation], *, pair_margin: float = 0.0, max_pairs_per_group: int = 8
) -> list[PreferenceExample]:
    """Pairs from differently rewarded rollouts of one group, at the first model turn where they differ."""
    by_group: dict[str, list[_Conversation]] = {}
    for c in convs:
        if c.run.reward is not None:
            by_group.setdefault(c.run.group, []).append(c)
    pairs: list[PreferenceExample] = []
    seen: set[str] = set()
    for members in by_group.values():
        found: list[tuple[float, PreferenceExample]] = []
        for i, a in enumerate(members):
            for b in members[i + 1 :]:
                gap = (a.run.reward or 0.0) - (b.run.reward or 0.0)
                if a.run.rollout.rollout_id == b.run.rollout.rollout_id or abs(gap) <= pair_margin:
                    continue
                hi, lo = (a.example, b.example) if gap > 0 else (b.example, a.example)
                if (hi.system, hi.tools) != (lo.system, lo.tools):
                    continue
                k = 0
                while (
                    k < min(len(hi.conversations), len(lo.conversations)) and hi.conversations[k] == lo.conversations[k]
                ):
                    k += 1
                if k % 2 == 0 or k >= min(len(hi.conversations), len(lo.conversations)):
                    continue  # they differ on the user/tool side, or one is the other's prefix
                pair = PreferenceExample(
                    conversations=hi.conversations[:k], system=hi.system, tools=hi.tools,
                    chosen=hi.conversations[k], rejected=lo.conversations[k],
                )  # fmt: skip
                key = pair.model_dump_json()
                if key not in seen:
                    seen.add(key)
                    found.append((abs(gap), pair))
        found.sort(key=lambda x: -x[0])  # stable: equal gaps keep their order
        pairs.extend(p for _, p in found[:max_pairs_per_group])
    return pairs


def dataset_info(name: str, sft_file: str, pairs_file: str | None) -> dict[str, Any]:
    """The `dataset_info.json` entries of the exported files (data/README.md's sharegpt descriptions)."""
    columns = {"messages": "conversations", "system": "system", "tools": "tools"}
    info: dict[str, Any] = {f"{name}_sft": {"file_name": sft_file, "formatting": "sharegpt", "columns": columns}}
    if pairs_file is not None:
        info[f"{name}_dpo"] = {
            "file_name": pairs_file,
            "formatting": "sharegpt",
            "ranking": True,
            "columns": {**columns, "chosen": "chosen", "rejected": "rejected"},
        }
    return info


def _write_json(rows: Sequence[BaseModel], path: Path) -> None:
    path.write_text(json.dumps([r.model_dump(by_alias=True) for r in rows], ensure_ascii=False, indent=1) + "\n")


def write_llamafactory(
    runs: Sequence[RunCalls],
    out_dir: str | Path,
    *,
    name: str = "agentkiln",
    pairs: Literal["none", "group"] = "none",
    min_reward: float | None = None,
    pair_margin: float = 0.0,
) -> LlamaFactoryExport:
    """The SFT file (rollouts rewarded at least `min_reward`; None: all), the pairs file and dataset_info.json."""
    if pairs not in ("none", "group"):
        raise ValueError(f"pairs must be 'none' or 'group', not {pairs!r}")
    skipped: Counter[str] = Counter()
    convs = conversations(runs, skipped)
    sft = [c.example for c in convs if min_reward is None or (c.run.reward is not None and c.run.reward >= min_reward)]
    if len(sft) < len(convs):
        skipped["below_min_reward"] += len(convs) - len(sft)
    if not sft:
        raise ValueError(f"no conversations to export (left out: {dict(skipped) or 'no succeeded rollout'})")
    prefs = group_pairs(convs, pair_margin=pair_margin) if pairs == "group" else []
    if pairs == "group" and not prefs:
        raise ValueError("no preference pairs: no two rollouts of a group differ in reward at a model turn")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sft_file, pairs_file = f"{name}_sft.json", (f"{name}_dpo.json" if prefs else None)
    _write_json(sft, out / sft_file)
    if pairs_file is not None:
        _write_json(prefs, out / pairs_file)
    info = dataset_info(name, sft_file, pairs_file)
    (out / DATASET_INFO).write_text(json.dumps(info, indent=2) + "\n")
    files = [sft_file] + ([pairs_file] if pairs_file else []) + [DATASET_INFO]
    log.info(
        "LLaMA-Factory export in %s: %d conversations, %d pairs, left out %s", out, len(sft), len(prefs), dict(skipped)
    )
    return LlamaFactoryExport(sft=len(sft), pairs=len(prefs), files=files, skipped=dict(skipped))
