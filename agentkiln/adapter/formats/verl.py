"""Export runs for verl: the prompts as an RLHFDataset parquet, the sampled transitions as a DataProto batch.

Two files, because verl has two entry points and a user may want either:

* `prompts.parquet`: one row per task (rollout group) in the layout of verl's
  `verl/utils/dataset/rl_dataset.py` (`RLHFDataset`) and its `examples/data_preprocess/*.py`:
  `data_source`, `prompt` (chat messages, role/content), `ability`, `reward_model`
  {style, ground_truth} and `extra_info` {index, ...}. verl then samples its own rollouts from
  them (`data.train_files=.../prompts.parquet`). `ground_truth` is the task input as JSON, so a
  custom reward function (`custom_reward_function.path`) scores what the agent's reward scored.
  The agent's tools are not exported: verl runs its own (`tool_config_path`).
* `dataproto.npz`: the already-sampled transitions as the batch verl's trainer builds after a
  rollout (`verl/experimental/agent_loop/agent_loop.py` `_postprocess`, `ray_trainer.py`):
  `prompts` left-padded, `responses` right-padded, `input_ids` = both, `attention_mask`,
  `position_ids` (cumsum of the mask - 1, clipped at 0: `verl.utils.model.compute_position_id_with_mask`),
  `response_mask` (1 = sampled token, 0 = tool/template token or padding), `rollout_log_probs` and
  `old_log_probs` (the recorded sampling log-probs: verl's "bypass" mode, no recompute),
  `token_level_scores` = `token_level_rewards` (the sequence's reward at its last response token,
  as verl's `rm_scores`), and per-token `advantages`/`returns` (our GRPO advantage and return over
  the response mask, `compute_grpo_outcome_advantage`'s shape) for a user who skips verl's
  estimator; `uid` (the rollout group, verl's GRPO grouping index) in the non-tensor batch.
  Stored as plain arrays (no pickle, unlike `DataProto.save_to_disk`); `load_dataproto` turns
  them into `DataProto.from_dict(**...)` arguments.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from agentkiln.adapter.formats.chat import RunCalls, request_messages, text_of
from agentkiln.models import Transition

log = logging.getLogger(__name__)

PROMPTS_FILE = "prompts.parquet"
DATAPROTO_FILE = "dataproto.npz"
DATA_SOURCE = "agentkiln"
FORMAT = "agentkiln.verl/1"
INT_FIELDS = ("prompts", "responses", "input_ids", "attention_mask", "position_ids", "response_mask")
FLOAT_FIELDS = (
    "rollout_log_probs",
    "old_log_probs",
    "token_level_scores",
    "token_level_rewards",
    "advantages",
    "returns",
)
NON_TENSOR_FIELDS = ("uid", "rollout_id", "attempt_id", "agent", "model_version")


class VerlPromptRow(BaseModel):
    """One RLHFDataset row (the fields verl's data_preprocess scripts write)."""

    model_config = ConfigDict(extra="forbid")

    data_source: str = DATA_SOURCE
    prompt: list[dict[str, str]]
    ability: str = "agent"
    reward_model: dict[str, str]
    extra_info: dict[str, Any]


def prompt_rows(runs: Iterable[RunCalls]) -> list[VerlPromptRow]:
    """One row per rollout group: the first call's messages (role and text content) of its first rollout."""
    rows: list[VerlPromptRow] = []
    seen: set[str] = set()
    for run in runs:
        group = run.group
        if group in seen or not run.calls:
            continue
        messages = [
            {"role": str(m.get("role", "user")), "content": text_of(m.get("content"))}
            for m in request_messages(run.calls[0])
        ]
        if not messages:
            continue
        seen.add(group)
        task = json.dumps(run.rollout.input, sort_keys=True, ensure_ascii=False, default=str)
        rows.append(
            VerlPromptRow(
                prompt=messages,
                reward_model={"style": "rule", "ground_truth": task},
                extra_info={
                    "index": len(rows),
                    "group_id": group,
                    "rollout_id": run.rollout.rollout_id,
                    "split": run.rollout.mode.value if run.rollout.mode is not None else "train",
                },
            )
        )
    return rows


def write_prompts(rows: Sequence[VerlPromptRow], path: str | Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not rows:
        raise ValueError("no prompts to export (no succeeded rollout with a recorded chat request)")
    pq.write_table(pa.Table.from_pylist([r.model_dump() for r in rows]), str(path))
    return len(rows)


def dataproto_arrays(
    transitions: Sequence[Transition], *, pad_token_id: int = 0, reward: Literal["return", "reward"] = "return"
) -> dict[str, Any]:
    """The padded DataProto arrays of `transitions` (numpy; `reward`: the return or the step's own reward)."""
    import numpy as np

    if not transitions:
        raise ValueError("no transitions to export")
    n = len(transitions)
    plen = max(len(t.prompt_ids) for t in transitions)
    rlen = max(len(t.response_ids) for t in transitions)
    prompts = np.full((n, plen), pad_token_id, dtype=np.int64)
    responses = np.full((n, rlen), pad_token_id, dtype=np.int64)
    attention = np.zeros((n, plen + rlen), dtype=np.int64)
    mask = np.zeros((n, rlen), dtype=np.int64)
    logp = np.zeros((n, rlen), dtype=np.float32)
    scores = np.zeros((n, rlen), dtype=np.float32)
    adv = np.zeros((n, rlen), dtype=np.float32)
    ret = np.zeros((n, rlen), dtype=np.float32)
    for i, t in enumerate(transitions):
        p, r = len(t.prompt_ids), len(t.response_ids)
        if p == 0 or r == 0:
            raise ValueError(f"transition {t.rollout_id}/{t.step} has an empty prompt or response")
        prompts[i, plen - p :] = t.prompt_ids
        responses[i, :r] = t.response_ids
        attention[i, plen - p : plen + r] = 1
        mask[i, :r] = t.response_mask if t.response_mask else [1] * r
        logp[i, :r] = t.logprobs
        scores[i, r - 1] = t.return_ if reward == "return" else t.reward
        adv[i, :r] = t.advantage * mask[i, :r]
        ret[i, :r] = t.return_ * mask[i, :r]
    tensors = {
        "prompts": prompts,
        "responses": responses,
        "input_ids": np.concatenate([prompts, responses], axis=1),
        "attention_mask": attention,
        "position_ids": np.clip(np.cumsum(attention, axis=1) - 1, 0, None),
        "response_mask": mask,
        "rollout_log_probs": logp,
        "old_log_probs": logp.copy(),
        "token_level_scores": scores,
        "token_level_rewards": scores.copy(),
        "advantages": adv,
        "returns": ret,
    }
    non_tensors = {
        "uid": [t.group_id or t.rollout_id for t in transitions],
        "rollout_id": [t.rollout_id for t in transitions],
        "attempt_id": [t.attempt_id for t in transitions],
        "agent": [t.agent or "" for t in transitions],
        "model_version": [t.model_version or "" for t in transitions],
    }
    temperatures = {t.temperature for t in transitions}
    meta: dict[str, Any] = {"format": FORMAT, "pad_token_id": pad_token_id, "reward": reward}
    if len(temperatures) == 1 and None not in temperatures:
        meta["temperature"] = temperatures.pop()  # what verl's compute_log_prob reads from meta_info
    return {"tensors": tensors, "non_tensors": non_tensors, "meta_info": meta}


def write_dataproto(transitions: Sequence[Transition], path: str | Path, **options: Any) -> int:
    import numpy as np

    arrays = dataproto_arrays(transitions, **options)
    fields = {f"batch.{k}": v for k, v in arrays["tensors"].items()}
    fields.update({f"non_tensor_batch.{k}": np.array(v, dtype=np.str_) for k, v in arrays["non_tensors"].items()})
    with Path(path).open("wb") as f:  # a file object: numpy would append .npz to a name without it
        np.savez_compressed(f, meta_info=np.array(json.dumps(arrays["meta_info"])), **fields)
    return len(transitions)


def load_dataproto(path: str | Path) -> dict[str, Any]:
    """`dataproto.npz` as `DataProto.from_dict` keyword arguments: torch tensors, object arrays, meta_info.

    `verl.DataProto.from_dict(**load_dataproto(path))` is the batch; nothing here imports verl.
    """
    import numpy as np
    import torch

    with np.load(Path(path), allow_pickle=False) as data:
        meta = json.loads(str(data["meta_info"]))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not an AgentKiln verl export (format {meta.get('format')!r})")
        tensors = {k.split(".", 1)[1]: torch.from_numpy(data[k]) for k in data.files if k.startswith("batch.")}
        non_tensors = {
            k.split(".", 1)[1]: data[k].astype(object) for k in data.files if k.startswith("non_tensor_batch.")
        }
    return {"tensors": tensors, "non_tensors": non_tensors, "meta_info": meta}


def write_verl(
    runs: Sequence[RunCalls], transitions: Sequence[Transition], out_dir: str | Path, **options: Any
) -> dict[str, int]:
    """Both files into `out_dir`; returns how many prompts and transitions each holds."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {
        "transitions": write_dataproto(transitions, out / DATAPROTO_FILE, **options),
        "prompts": write_prompts(prompt_rows(runs), out / PROMPTS_FILE),
    }
    log.info("verl export in %s: %s", out, counts)
    return counts
