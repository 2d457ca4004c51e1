"""verl export: RLHFDataset prompt rows and DataProto tensors (padding, masks, rewards, grouping), its loader
and `kiln export --format verl`. The last tests run verl's own code where verl imports (skipped otherwise)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from agentkiln.adapter.export import read_jsonl
from agentkiln.adapter.formats.chat import run_calls
from agentkiln.adapter.formats.verl import (
    DATAPROTO_FILE,
    PROMPTS_FILE,
    dataproto_arrays,
    load_dataproto,
    prompt_rows,
    write_verl,
)
from agentkiln.adapter.transitions import build_batch
from tests.export_traces import SYSTEM, dumps, fill_store, runs

TENSORS = {
    "prompts": torch.int64, "responses": torch.int64, "input_ids": torch.int64, "attention_mask": torch.int64,
    "position_ids": torch.int64, "response_mask": torch.int64, "rollout_log_probs": torch.float32,
    "old_log_probs": torch.float32, "token_level_scores": torch.float32, "token_level_rewards": torch.float32,
    "advantages": torch.float32, "returns": torch.float32,
}  # fmt: skip


def _export(tmp_path: Path, merge: bool = True) -> tuple[Path, list]:
    traces = runs()
    transitions, _ = build_batch(traces, merge=merge)
    out = tmp_path / "verl"
    write_verl([r for r in (run_calls(*t) for t in traces) if r is not None], transitions, out)
    return out, transitions


def test_dataproto_layout_padding_masks_rewards_and_groups(tmp_path: Path) -> None:
    out, transitions = _export(tmp_path)
    assert [t.rollout_id for t in transitions] == ["r-right", "r-wrong", "r-resp"]  # merged: one per rollout
    data = load_dataproto(out / DATAPROTO_FILE)
    b, nt = data["tensors"], data["non_tensors"]
    assert {k: v.dtype for k, v in b.items()} == TENSORS
    assert b["prompts"].shape == (3, 4) and b["responses"].shape == (3, 5) and b["input_ids"].shape == (3, 9)
    # prompts left-padded, responses right-padded (pad id 0), input_ids = both
    assert b["prompts"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [7, 8, 9, 4]]
    assert b["responses"].tolist() == [[10, 11, 20, 30, 0], [10, 11, 20, 31, 32], [40, 41, 42, 0, 0]]
    assert torch.equal(b["input_ids"], torch.cat([b["prompts"], b["responses"]], dim=1))
    assert b["attention_mask"].tolist() == [
        [0, 1, 1, 1, 1, 1, 1, 1, 0],
        [0, 1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 0, 0],
    ]
    assert b["position_ids"][0].tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 6]
    # the tool result token (20) between the two calls is context: mask 0, log-prob 0
    assert b["response_mask"].tolist() == [[1, 1, 0, 1, 0], [1, 1, 0, 1, 1], [1, 1, 1, 0, 0]]
    assert np.allclose(b["rollout_log_probs"][0].numpy(), [-0.5, -0.6, 0.0, -0.5, 0.0])
    assert torch.equal(b["old_log_probs"], b["rollout_log_probs"])
    # sequence reward at the last response token (verl's rm_scores), nowhere else
    assert b["token_level_scores"].tolist() == [[0, 0, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0.5, 0, 0]]
    assert torch.equal(b["token_level_rewards"], b["token_level_scores"])
    # our GRPO advantage and return over the response mask
    adv = [t.advantage for t in transitions]
    assert adv[0] > 0 > adv[1] and adv[2] == 0.0
    assert np.allclose(b["advantages"].numpy(), np.array(adv)[:, None] * b["response_mask"].numpy())
    assert b["returns"][0].tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]
    # uid groups the rollouts of one task (verl's GRPO index); object arrays as DataProto wants
    assert nt["uid"].dtype == object and nt["uid"].tolist() == ["g-add", "g-add", "g-capital"]
    assert nt["rollout_id"].tolist() == ["r-right", "r-wrong", "r-resp"] and nt["agent"].tolist() == ["solver"] * 3
    assert data["meta_info"] == {
        "format": "agentkiln.verl/1",
        "pad_token_id": 0,
        "reward": "return",
        "temperature": 0.7,
    }


def test_unmerged_calls_are_one_row_each_and_step_rewards_can_be_chosen(tmp_path: Path) -> None:
    transitions, _ = build_batch(runs())
    arrays = dataproto_arrays(transitions, pad_token_id=99, reward="reward")
    assert arrays["tensors"]["prompts"].shape == (5, 6)
    assert arrays["tensors"]["prompts"][0].tolist() == [99, 99, 99, 1, 2, 3]
    assert arrays["non_tensors"]["uid"] == ["g-add"] * 4 + ["g-capital"]
    # final credit: the reward is on the rollout's last call; its return is on every call
    assert arrays["tensors"]["token_level_scores"].sum(axis=1).tolist() == [0.0, 1.0, 0.0, 0.0, 0.5]


def test_prompt_rows_in_rlhf_dataset_layout(tmp_path: Path) -> None:
    out, _ = _export(tmp_path)
    rows = pq.read_table(out / PROMPTS_FILE).to_pylist()
    assert [r["extra_info"]["group_id"] for r in rows] == ["g-add", "g-capital"]  # one row per task
    first = rows[0]
    assert set(first) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert first["data_source"] == "agentkiln" and first["ability"] == "agent"
    assert first["prompt"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2 + 3?"}]
    assert first["reward_model"] == {
        "style": "rule",
        "ground_truth": dumps({"question": "What is 2 + 3?", "answer": "5"}),
    }
    assert first["extra_info"] == {"index": 0, "group_id": "g-add", "rollout_id": "r-right", "split": "train"}
    assert rows[1]["prompt"] == [{"role": "user", "content": "Capital of France?"}]  # text parts joined
    assert rows[1]["extra_info"]["index"] == 1


def test_bad_input_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no transitions"):
        dataproto_arrays([])
    with pytest.raises(ValueError, match="no prompts"):
        write_verl([], build_batch(runs())[0], tmp_path / "v")
    other = tmp_path / "other.npz"
    np.savez(other, meta_info=np.array(json.dumps({"format": "x"})))
    with pytest.raises(ValueError, match="not an AgentKiln verl export"):
        load_dataproto(other)
    assert prompt_rows([]) == []


def _cli(*args: str):
    import agentkiln.cli.train  # noqa: F401  (registers the command)
    from agentkiln.cli.app import app

    return CliRunner().invoke(app, ["export", *args], env={"COLUMNS": "200"})  # errors on one line


def test_kiln_export_verl_from_a_store(tmp_path: Path) -> None:
    db = tmp_path / "kiln.db"
    asyncio.run(fill_store(str(db), runs()))
    res = _cli(str(tmp_path / "out"), "--store", str(db), "--format", "verl", "--merge")
    assert res.exit_code == 0, res.output
    assert "wrote 3 transitions and 2 prompts" in res.output
    data = load_dataproto(tmp_path / "out" / DATAPROTO_FILE)
    assert sorted(data["non_tensors"]["uid"].tolist()) == ["g-add", "g-add", "g-capital"]
    assert pq.read_table(tmp_path / "out" / PROMPTS_FILE).num_rows == 2
    res = _cli(str(tmp_path / "t.jsonl"), "--store", str(db))  # the default stays today's JSONL of transitions
    assert res.exit_code == 0 and "wrote 5 transitions" in res.output
    assert len(read_jsonl(tmp_path / "t.jsonl")) == 5


def test_kiln_export_refuses_unknown_format_and_misplaced_options(tmp_path: Path) -> None:
    res = _cli(str(tmp_path / "o"), "--store", str(tmp_path / "none.db"), "--format", "parquet")
    assert res.exit_code != 0 and "use one of jsonl, verl, llamafactory" in res.output
    res = _cli(str(tmp_path / "o"), "--store", str(tmp_path / "none.db"), "--format", "verl", "--pairs", "group")
    assert res.exit_code != 0 and "belong to --format llamafactory" in res.output
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    res = _cli(str(a_file), "--store", str(tmp_path / "none.db"), "--format", "verl")
    assert res.exit_code != 0 and "writes a folder" in res.output


# --------------------------------------------------------------------------- verl's own code (if it imports)


def _verl():
    return pytest.importorskip("verl.protocol", reason="verl not installed (tests above check its documented fields)")


def test_verl_builds_a_dataproto_and_its_grpo_groups_by_uid(tmp_path: Path) -> None:
    protocol = _verl()
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage
    from verl.utils.model import compute_position_id_with_mask

    out, transitions = _export(tmp_path)
    batch = protocol.DataProto.from_dict(**load_dataproto(out / DATAPROTO_FILE))
    batch.check_consistency()
    assert len(batch) == 3 and batch.meta_info["temperature"] == 0.7
    assert torch.equal(batch.batch["position_ids"], compute_position_id_with_mask(batch.batch["attention_mask"]))
    rlen = batch.batch["responses"].shape[1]
    assert torch.all(batch.batch["response_mask"] <= batch.batch["attention_mask"][:, -rlen:])  # compute_response_mask
    adv, _ = compute_grpo_outcome_advantage(
        batch.batch["token_level_rewards"], batch.batch["response_mask"], index=batch.non_tensor_batch["uid"]
    )
    assert adv[0, 0] > 0 > adv[1, 0]  # right vs wrong in g-add, as our own GRPO advantages
    assert np.sign(adv[:2, 0].numpy()).tolist() == np.sign([t.advantage for t in transitions[:2]]).tolist()
    assert adv[0, 2] == 0 and adv[0, 4] == 0  # the tool result token and padding get none
    assert adv[2, 0] == pytest.approx(0.5)  # verl scores a group of one against mean 0, std 1 (ours: 0)


def test_verl_rlhf_dataset_reads_the_prompts(tmp_path: Path) -> None:
    _verl()
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from agentkiln.engine.model_files import load_tokenizer, tiny_model_dir

    out, _ = _export(tmp_path)
    config = OmegaConf.create({"cache_dir": str(tmp_path / "cache"), "filter_overlong_prompts": False})
    ds = RLHFDataset(str(out / PROMPTS_FILE), load_tokenizer(str(tiny_model_dir())), config)
    assert len(ds) == 2
    item = ds[0]
    assert item["raw_prompt"][1] == {"role": "user", "content": "What is 2 + 3?"}
    assert item["index"] == 0 and item["data_source"] == "agentkiln"
    assert json.loads(item["reward_model"]["ground_truth"])["answer"] == "5"
