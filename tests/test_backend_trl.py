"""TRL as a training backend (agentkiln/backends/trl): SFT, DPO and GRPO with TRL's trainers on the
recorded token ids, ending with the new weights served by the engine.

Each training test measures what the algorithm must do to the model (SFT: the imitated answers
get likelier; DPO and GRPO: the preferred / rewarded answers get likelier than the others), so a
backend that trains nothing, trains on the wrong tokens or with the wrong sign fails.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from agentkiln.algorithms.dpo.algorithm import PreferencePair
from agentkiln.algorithms.offline import OfflineConfig, select_training_data
from agentkiln.backends.trl import TRLBackendConfig, train_with_trl
from agentkiln.backends.trl.datasets import IGNORE_INDEX, group_rollout, grpo_groups, sft_rows
from agentkiln.engine.embedded import TransformersEngine
from agentkiln.engine.model_files import load_model
from agentkiln.engine.weight_roots import WeightsPolicy
from agentkiln.models import Transition
from agentkiln.server.app import create_app
from agentkiln.server.serve import ServerThread
from agentkiln.store.client import HttpStore
from agentkiln.store.memory import InMemoryStore
from agentkiln.training.config import LoraSettings
from agentkiln.training.context import TrainingContext
from agentkiln.training.trace import load_traces_from
from tests.test_offline import CORRECT, store_db, tiny_dir  # noqa: F401  (fixtures: 2 questions x 4 rated answers)

FAST = dict(lora=LoraSettings(r=4, alpha=8), lr=2e-2, bf16=False, batch_size=4)


def _t(i: int, response: list[int], *, group: str | None = "g", step: int = 0, ret: float = 0.0,
       mask: list[int] | None = None) -> Transition:  # fmt: skip
    return Transition(rollout_id=f"r{i}", attempt_id=f"a{i}", step=step, prompt_ids=[1, 2, 3], response_ids=response,
                      logprobs=[-1.0] * len(response), response_mask=mask or [], group_id=group,
                      **{"return": ret})  # fmt: skip


def _logprob(model: torch.nn.Module, t: Transition) -> float:
    ids = torch.tensor([t.prompt_ids + t.response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(t.prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(t.response_ids)[:, None]).sum().item()


def _scores(model_dir: str, adapter: str | None, transitions: list[Transition]) -> list[float]:
    model = load_model(model_dir, "float32")
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return [_logprob(model, t) for t in transitions]


def _traces(store_db: Path) -> list[Transition]:  # noqa: F811
    traces = asyncio.run(load_traces_from(str(store_db)))
    return select_training_data(traces, OfflineConfig(algorithm="grpo", backend="trl"))[1]


def _gap(scores: list[float], good: list[bool]) -> float:
    """Mean log-prob of the good answers minus that of the others."""
    pos = [s for s, g in zip(scores, good) if g]
    neg = [s for s, g in zip(scores, good) if not g]
    return sum(pos) / len(pos) - sum(neg) / len(neg)


# --------------------------------------------------------------------------- datasets


def test_sft_rows_label_only_the_generated_tokens():
    rows = sft_rows([_t(0, [7, 8, 9], mask=[1, 0, 1]), _t(1, [5], mask=[0])])
    assert rows.rows == [{"input_ids": [1, 2, 3, 7, 8, 9], "labels": [IGNORE_INDEX] * 3 + [7, IGNORE_INDEX, 9]}]
    assert rows.dropped == {"no generated token": 1}


def test_grpo_groups_are_calls_of_one_turn_and_one_size():
    calls = [_t(i, [10 + i], group="g1", ret=float(i % 2)) for i in range(4)]  # a group of 4 (turn 0)
    calls += [_t(10 + i, [20 + i], group="g2", ret=1.0) for i in range(3)]  # 3: not TRL's group size
    calls += [_t(20 + i, [30 + i], group="g1", step=1) for i in range(4)]  # turn 1 of g1: its own group
    calls += [_t(30, [40], group=None)]
    groups = grpo_groups(calls)
    assert groups.size == 4 and len(groups.groups) == 2
    assert groups.dropped == {"group of 3 calls (TRL needs 4 per group)": 3, "no group": 1}
    key = groups.rows[0]["prompt"]
    once = group_rollout(groups, [key])  # a group key once: all its calls
    repeated = group_rollout(groups, [key] * 4)  # once per completion: one call each
    assert once == repeated and once["completion_ids"] == [[10], [11], [12], [13]]
    assert once["kiln_return"] == [0.0, 1.0, 0.0, 1.0] and once["prompt_ids"] == [[1, 2, 3]] * 4
    with pytest.raises(ValueError, match="not a recorded group"):
        group_rollout(groups, ["what"])


def test_config_refuses_unknown_settings(tmp_path, tiny_dir):  # noqa: F811
    with pytest.raises(ValueError, match="unknown algorithm"):
        TRLBackendConfig(algorithm="ppo")
    with pytest.raises(ValueError, match="not fields of trl.SFTConfig: no_such_field"):
        train_with_trl([_t(0, [7, 8])], tiny_dir, tmp_path, TRLBackendConfig(**FAST, args={"no_such_field": 1}))
    with pytest.raises(TypeError, match="PreferencePair"):
        train_with_trl([_t(0, [7, 8])], tiny_dir, tmp_path, TRLBackendConfig(algorithm="dpo", **FAST))


# --------------------------------------------------------------------------- training (tiny model)


def test_trl_sft_makes_the_imitated_answers_likelier(store_db, tiny_dir, tmp_path):  # noqa: F811
    good = [t for t in _traces(store_db) if t.return_ == 1.0]
    result = train_with_trl(good, tiny_dir, tmp_path, TRLBackendConfig(**FAST, epochs=3))
    assert result.trained_on == 4 and result.adapter == str(tmp_path / "adapter")
    assert json.loads((tmp_path / "trl_result.json").read_text())["trained_on"] == 4
    before, after = _scores(tiny_dir, None, good), _scores(tiny_dir, result.adapter, good)
    assert sum(after) > sum(before) + 1.0, (before, after)


def test_trl_dpo_prefers_the_chosen_answers(store_db, tiny_dir, tmp_path):  # noqa: F811
    calls = _traces(store_db)
    pairs = [PreferencePair(chosen=c, rejected=r) for c in calls for r in calls
             if c.prompt_ids == r.prompt_ids and c.return_ == 1.0 and r.return_ == 0.0]  # fmt: skip
    result = train_with_trl(pairs, tiny_dir, tmp_path, TRLBackendConfig(algorithm="dpo", **FAST, epochs=3))
    assert result.trained_on == len(pairs) == 8
    flat = [t for p in pairs for t in (p.chosen, p.rejected)]
    good = [i % 2 == 0 for i in range(len(flat))]
    before, after = _gap(_scores(tiny_dir, None, flat), good), _gap(_scores(tiny_dir, result.adapter, flat), good)
    assert after > before + 0.5, (before, after)


def test_trl_grpo_makes_the_rewarded_answers_likelier_than_the_others(store_db, tiny_dir, tmp_path):  # noqa: F811
    calls = _traces(store_db)
    result = train_with_trl(calls, tiny_dir, tmp_path, TRLBackendConfig(algorithm="grpo", **FAST, epochs=3))
    assert result.trained_on == 8 and result.dropped == {}  # two questions, groups of 4 by identical input
    assert any(m.get("reward_std", 0) > 0 for m in result.metrics)  # TRL saw the recorded returns
    good = [t.return_ == 1.0 for t in calls]
    before, after = _gap(_scores(tiny_dir, None, calls), good), _gap(_scores(tiny_dir, result.adapter, calls), good)
    assert after > before + 0.5, (before, after)


# --------------------------------------------------------------------------- kiln train-offline --backend trl


async def _serve_published(url: str, tmp_path: Path, run) -> tuple[dict, str]:  # noqa: ANN001
    async with HttpStore(url) as store:
        summary = await asyncio.to_thread(run)
        ctx = TrainingContext(store=store, server_url=url, run_dir=tmp_path)
        await ctx.wait_for_resources_served(summary["resources_id"], timeout=60)
        return summary, (await ctx.engine_status())["model_version"]


def test_cli_trains_with_trl_and_the_engine_serves_the_result(store_db, tiny_dir, tmp_path):  # noqa: F811
    import agentkiln.cli.train  # noqa: F401  (registers the command)
    from agentkiln.cli.app import app

    out = tmp_path / "trl-out"
    engine = TransformersEngine(tiny_dir, model_name="tiny", dtype="float32")
    app_ = create_app(InMemoryStore(sweep_interval_s=None), sweep_interval_s=0, model_sync_interval_s=0.05,
                      weights_policy=WeightsPolicy.build([tmp_path], env={}))  # fmt: skip
    app_.state.engine = engine
    server = ServerThread(app_)
    url = server.start()

    def run() -> dict:
        res = CliRunner().invoke(app, [
            "train-offline", "--store", str(store_db), "--backend", "trl", "--algorithm", "sft", "--out", str(out),
            "--model-dir", tiny_dir, "--lr", "1e-2", "--set", "trl.lora.r=4", "--set", "trl.bf16=false",
            "--publish", url,
        ])  # fmt: skip
        assert res.exit_code == 0, res.output
        return json.loads(next(line for line in res.stdout.splitlines() if line.startswith("{")))

    try:
        summary, version = asyncio.run(_serve_published(url, tmp_path, run))
    finally:
        server.stop()
        asyncio.run(engine.close())
    assert summary["trained_transitions"] == 4 and summary["adapter"] == str(out / "adapter")
    assert version != "base"  # the engine serves the TRL-trained adapter now
    assert json.loads((out / "trl_result.json").read_text())["metrics"]


def test_cli_rejects_an_unknown_backend(store_db, tmp_path):  # noqa: F811
    import agentkiln.cli.train  # noqa: F401
    from agentkiln.cli.app import app

    res = CliRunner().invoke(app, ["train-offline", "--store", str(store_db), "--backend", "verl", "--out",
                                   str(tmp_path)])  # fmt: skip
    assert res.exit_code != 0 and "trl" in res.output and "verl" in res.output
