"""LLaMA-Factory export: sharegpt conversations with tool calls, preference pairs from rollout groups,
dataset_info.json, and `kiln export --format llamafactory`. The last test runs LLaMA-Factory's own
converter where it imports (skipped otherwise)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agentkiln.adapter.formats.chat import run_calls
from agentkiln.adapter.formats.llamafactory import (
    DATASET_INFO,
    OBSERVATION_JOIN,
    conversation,
    conversations,
    write_llamafactory,
)
from tests.export_traces import SYSTEM, TOOL_CALL, TOOLS, fill_store, runs

ADD_CALL = json.dumps({"name": "add", "arguments": {"a": 2, "b": 3}})
ADD_PROMPT = [
    {"from": "human", "value": "What is 2 + 3?"},
    {"from": "function_call", "value": ADD_CALL},
    {"from": "observation", "value": "5"},
]


def _runs():
    return [r for r in (run_calls(*t) for t in runs()) if r is not None]


def _read(path: Path):
    return json.loads(path.read_text())


def test_sft_conversations_with_tool_calls(tmp_path: Path) -> None:
    res = write_llamafactory(_runs(), tmp_path)
    assert (res.sft, res.pairs, res.files) == (3, 0, ["agentkiln_sft.json", DATASET_INFO])
    rows = _read(tmp_path / "agentkiln_sft.json")
    # each rollout's first call is carried on by its second: one conversation per rollout
    assert rows[0] == {
        "conversations": [*ADD_PROMPT, {"from": "gpt", "value": "5"}],
        "system": SYSTEM,
        "tools": json.dumps([TOOLS[0]["function"]]),  # function schemas, as glaive_toolcall_en_demo.json
    }
    assert rows[1]["conversations"][-1] == {"from": "gpt", "value": "6"}
    assert rows[2] == {
        "conversations": [{"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris"}],
        "system": "",
        "tools": "",
    }  # the responses API call: content parts joined, reply read from its output items
    for row in rows:  # LLaMA-Factory's rule: human/observation at even positions, gpt/function_call at odd
        roles = [t["from"] for t in row["conversations"]]
        assert all(r in ("human", "observation") for r in roles[0::2])
        assert all(r in ("gpt", "function_call") for r in roles[1::2]) and len(roles) % 2 == 0


def test_preference_pairs_from_a_rollout_group(tmp_path: Path) -> None:
    res = write_llamafactory(_runs(), tmp_path, pairs="group")
    assert res.pairs == 1 and res.files == ["agentkiln_sft.json", "agentkiln_dpo.json", DATASET_INFO]
    assert _read(tmp_path / "agentkiln_dpo.json") == [{
        "conversations": ADD_PROMPT,  # the shared turns, ending on the user side
        "system": SYSTEM,
        "tools": json.dumps([TOOLS[0]["function"]]),
        "chosen": {"from": "gpt", "value": "5"},  # reward 1
        "rejected": {"from": "gpt", "value": "6"},  # reward 0
    }]  # fmt: skip


def test_dataset_info_describes_both_files(tmp_path: Path) -> None:
    write_llamafactory(_runs(), tmp_path, pairs="group", name="calc")
    info = _read(tmp_path / DATASET_INFO)
    assert info == {
        "calc_sft": {"file_name": "calc_sft.json", "formatting": "sharegpt",
                     "columns": {"messages": "conversations", "system": "system", "tools": "tools"}},
        "calc_dpo": {"file_name": "calc_dpo.json", "formatting": "sharegpt", "ranking": True,
                     "columns": {"messages": "conversations", "system": "system", "tools": "tools",
                                 "chosen": "chosen", "rejected": "rejected"}},
    }  # fmt: skip
    for entry in info.values():
        assert (tmp_path / entry["file_name"]).exists()


def test_min_reward_keeps_the_good_rollouts(tmp_path: Path) -> None:
    res = write_llamafactory(_runs(), tmp_path, min_reward=1.0)
    assert res.sft == 1 and res.skipped == {"below_min_reward": 2}
    assert _read(tmp_path / "agentkiln_sft.json")[0]["conversations"][-1]["value"] == "5"


def test_parallel_calls_tool_results_and_rows_llamafactory_would_reject() -> None:
    second = {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": "not json"}}
    system, turns = conversation(
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "let me add", "tool_calls": [TOOL_CALL, second]},
            {"role": "tool", "tool_call_id": "call_1", "content": "5"},
            {"role": "tool", "tool_call_id": "call_2", "content": "error"},
            {"role": "assistant", "content": "5"},
        ]
    )  # type: ignore[misc]
    assert system == "s"
    assert [t.from_ for t in turns] == ["human", "function_call", "observation", "gpt"]
    assert json.loads(turns[1].value) == [
        {"name": "add", "arguments": {"a": 2, "b": 3}},
        {"name": "add", "arguments": "not json"},
    ]  # parallel: a list; text dropped
    assert turns[2].value == "5" + OBSERVATION_JOIN + "error"
    assert conversation([{"role": "user", "content": "q"}, {"role": "system", "content": "late"}]) == "system_midway"
    after_tool = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [TOOL_CALL]},
        {"role": "tool", "content": "5"},
        {"role": "user", "content": "and?"},
    ]
    assert conversation(after_tool) == "roles_not_alternating"
    assert conversation([{"role": "assistant", "content": "hi"}]) == "roles_not_alternating"


def test_calls_without_a_reply_are_counted_and_nothing_to_export_is_an_error(tmp_path: Path) -> None:
    runs_ = _runs()[2:]  # the responses-API run alone
    runs_[0].calls[0].response = None
    skipped: Counter[str] = Counter()
    assert conversations(runs_, skipped) == [] and skipped == {"no_reply": 1}
    with pytest.raises(ValueError, match="no conversations to export"):
        write_llamafactory(runs_, tmp_path)
    with pytest.raises(ValueError, match="no preference pairs"):
        write_llamafactory(_runs()[2:], tmp_path, pairs="group")
    with pytest.raises(ValueError, match="pairs must be"):
        write_llamafactory(_runs(), tmp_path, pairs="feedback")  # type: ignore[arg-type]


def _cli(*args: str):
    import agentkiln.cli.train  # noqa: F401  (registers the command)
    from agentkiln.cli.app import app

    return CliRunner().invoke(app, ["export", *args], env={"COLUMNS": "200"})


def test_kiln_export_llamafactory_from_a_store(tmp_path: Path) -> None:
    db = tmp_path / "kiln.db"
    asyncio.run(fill_store(str(db), runs()))
    out = tmp_path / "lf"
    res = _cli(str(out), "--store", str(db), "--format", "llamafactory", "--pairs", "group")
    assert res.exit_code == 0, res.output
    assert "wrote 3 conversations and 1 pairs" in res.output
    assert _read(out / "agentkiln_dpo.json")[0]["chosen"] == {"from": "gpt", "value": "5"}
    assert set(_read(out / DATASET_INFO)) == {"agentkiln_sft", "agentkiln_dpo"}
    res = _cli(str(tmp_path / "x"), "--store", str(db), "--format", "llamafactory", "--pairs", "feedback")
    assert res.exit_code != 0 and "use none or group" in res.output
    res = _cli(str(tmp_path / "y"), "--store", str(db), "--format", "llamafactory", "--min-reward", "5")
    assert res.exit_code != 0 and "no conversations to export" in res.output


def test_llamafactory_converter_reads_the_export(tmp_path: Path) -> None:
    """LLaMA-Factory's own dataset parser and sharegpt converter (and its tool-call formatter) on the files."""
    converter = pytest.importorskip("llamafactory.data.converter", reason="llamafactory not installed")
    from llamafactory.data.formatter import FunctionFormatter, ToolFormatter
    from llamafactory.data.parser import get_dataset_list

    write_llamafactory(_runs(), tmp_path, pairs="group")
    for name, file in (("agentkiln_sft", "agentkiln_sft.json"), ("agentkiln_dpo", "agentkiln_dpo.json")):
        (attr,) = get_dataset_list([name], str(tmp_path))
        convert = converter.SharegptDatasetConverter(attr, None)
        for row in _read(tmp_path / file):
            out = convert(row)
            assert out["_prompt"] and out["_response"], f"{name}: LLaMA-Factory dropped {row}"
            assert out["_system"] == row["system"] and out["_tools"] == row["tools"]
    sft = _read(tmp_path / "agentkiln_sft.json")[0]
    call = FunctionFormatter(slots=["{{content}}"], tool_format="default").apply(
        content=sft["conversations"][1]["value"]
    )
    assert call == ['Action: add\nAction Input: {"a": 2, "b": 3}']
    assert "add" in ToolFormatter(tool_format="default").apply(content=sft["tools"])[0]
