"""Offline training from a store file: traces -> transitions -> SFT / GRPO, via the library and `kiln train-offline`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agentkiln.algorithms.grpo import GRPOConfig, LoraSettings
from agentkiln.algorithms.offline import OfflineConfig, select_training_data, train_offline
from agentkiln.algorithms.sft import SFTConfig
from agentkiln.engine.model_files import load_tokenizer, tiny_model_dir
from agentkiln.models import AttemptStatus, RolloutMode, SpanIn, Transition
from agentkiln.protocol import SpanAttrs, SpanNames
from agentkiln.store import open_store
from agentkiln.training.learner import Learner as GRPOLearner
from agentkiln.training.trace import load_traces_from

QUESTIONS = ["What is 2 + 2?", "What is 3 + 5?"]
ANSWERS = {"What is 2 + 2?": ["4", "5", "4", "22"], "What is 3 + 5?": ["8", "35", "9", "8"]}
CORRECT = {"What is 2 + 2?": "4", "What is 3 + 5?": "8"}


@pytest.fixture(scope="module")
def tiny_dir() -> str:
    return str(tiny_model_dir())


def _sampling_logprobs(model_dir: str, prompt: list[int], response: list[int]) -> list[float]:
    """What an engine serving the tiny model would have recorded (the LoRA starts as the base model)."""
    learner = _learner_cache.setdefault(model_dir, GRPOLearner(model_dir, GRPOConfig(lora=LoraSettings(r=2), bf16=False)))
    t = Transition(rollout_id="x", attempt_id="x", step=0, prompt_ids=prompt, response_ids=response,
                   logprobs=[0.0] * len(response))
    return learner.logprobs([t])[0]


_learner_cache: dict[str, GRPOLearner] = {}


async def _fill(db: Path, model_dir: str) -> None:
    """Production-like traffic: 2 questions x 4 runs, each one LLM call recorded with token ids, plus a reward.
    No group_id: rollouts of the same question are grouped by their identical input."""
    tok = load_tokenizer(model_dir)
    store = open_store(str(db))
    try:
        for q in QUESTIONS:
            for answer in ANSWERS[q]:
                ar = await store.start_rollout({"question": q}, mode=RolloutMode.train)
                rid, aid = ar.rollout.rollout_id, ar.attempt.attempt_id
                prompt = list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                      tokenize=True)["input_ids"])
                response = tok.encode(answer, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
                await store.add_spans([
                    SpanIn(rollout_id=rid, attempt_id=aid, name=SpanNames.llm_call, attributes={
                        SpanAttrs.prompt_token_ids: prompt,
                        SpanAttrs.response_token_ids: response,
                        SpanAttrs.response_logprobs: _sampling_logprobs(model_dir, prompt, response),
                        SpanAttrs.agent_name: "solver",
                        SpanAttrs.finish_reason: "stop",
                    }),
                    SpanIn(rollout_id=rid, attempt_id=aid, name=SpanNames.reward, attributes={
                        SpanAttrs.reward_value: 1.0 if answer == CORRECT[q] else 0.0, SpanAttrs.reward_final: True,
                    }),
                ])
                await store.update_attempt(rid, aid, status=AttemptStatus.succeeded)
        # An unfinished rollout is not read.
        await store.start_rollout({"question": "pending"}, mode=RolloutMode.train)
    finally:
        await store.close()


@pytest.fixture(scope="module")
def store_db(tmp_path_factory, tiny_dir: str) -> Path:
    db = tmp_path_factory.mktemp("offline") / "kiln.db"
    asyncio.run(_fill(db, tiny_dir))
    return db


def test_traces_to_training_data(store_db: Path) -> None:
    traces = asyncio.run(load_traces_from(str(store_db)))
    assert len(traces) == 8
    all_t, sft, skipped = select_training_data(traces, OfflineConfig(algorithm="sft"))
    assert len(all_t) == 8 and skipped == {}
    assert len(sft) == 4 and all(t.return_ == 1.0 for t in sft)
    top1 = select_training_data(traces, OfflineConfig(algorithm="sft", min_reward=None, top_k=1))[1]
    assert len(top1) == 2 and len({t.group_id for t in top1}) == 2  # one per question, grouped by input
    _, grpo, _ = select_training_data(traces, OfflineConfig(algorithm="grpo"))
    assert len(grpo) == 8 and all((t.advantage > 0) == (t.return_ == 1.0) for t in grpo)


def test_offline_sft_lowers_the_loss_of_the_good_answers(store_db: Path, tmp_path: Path, tiny_dir: str) -> None:
    traces = asyncio.run(load_traces_from(str(store_db)))
    config = OfflineConfig(algorithm="sft", model_dir=tiny_dir, epochs=3,
                           sft=SFTConfig(lr=1e-2, batch_size=4, lora=LoraSettings(r=4, alpha=8), bf16=False))
    result = train_offline(traces, tmp_path, config)
    assert result.trained_transitions == 4
    assert result.metrics[0]["optimizer_steps"] == 3
    assert result.metrics[0]["loss"] < result.metrics[0]["first_loss"]
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    saved = json.loads((tmp_path / "offline_result.json").read_text())
    assert saved["rollouts"] == 8 and saved["adapter"] == result.adapter


@pytest.mark.parametrize("algorithm", ["sft", "grpo"])
def test_kiln_train_offline_cli(store_db: Path, tmp_path: Path, tiny_dir: str, algorithm: str) -> None:
    import agentkiln.cli.train  # noqa: F401  (registers the command)
    from agentkiln.cli.app import app

    out = tmp_path / "offline"
    res = CliRunner().invoke(app, [
        "train-offline", "--store", str(store_db), "--algorithm", algorithm, "--out", str(out),
        "--model-dir", tiny_dir, "--lr", "1e-3", "--epochs", "1",
    ])
    assert res.exit_code == 0, res.output
    summary = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("{")))
    assert summary["rollouts"] == 8
    assert summary["trained_transitions"] == (4 if algorithm == "sft" else 8)
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    result = json.loads((out / "offline_result.json").read_text())
    assert result["metrics"] and result["metrics"][0]["optimizer_steps"] >= 1
    if algorithm == "grpo":
        # Recorded logprobs match the starting weights: ratios start at 1, nothing is clipped.
        assert abs(result["metrics"][0]["ratio_mean"] - 1.0) < 0.05


def test_cli_rejects_unknown_algorithm(store_db: Path, tmp_path: Path) -> None:
    import agentkiln.cli.train  # noqa: F401
    from agentkiln.cli.app import app

    res = CliRunner().invoke(app, ["train-offline", "--store", str(store_db), "--algorithm", "ppo", "--out",
                                   str(tmp_path)])
    assert res.exit_code != 0


def test_kiln_train_algorithm_choice(tmp_path: Path) -> None:
    """`kiln train --algorithm grpo|sft|apo` builds the matching algorithm (the run itself needs a server)."""
    import typer

    from agentkiln.algorithms.apo import APO
    from agentkiln.algorithms.grpo import GRPO
    from agentkiln.algorithms.sft import SFT
    from agentkiln.cli.train import _build_algorithm

    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("Answer {question}.")
    opts = dict(model_dir=None, steps=3, tasks_per_step=2, samples=4, lr=1e-4, temperature=0.7, agent_match=None,
                eval_every=1, resume=False, min_reward=0.5, prompt_name="system", prompt=f"@{prompt_file}", beam=3,
                optimizer_url="http://opt/v1", optimizer_model="big", optimizer_key=None)
    assert isinstance(_build_algorithm("grpo", **opts), GRPO)
    sft = _build_algorithm("sft", **opts)
    assert isinstance(sft, SFT) and sft.rounds == 3 and sft.min_reward == 0.5
    apo = _build_algorithm("apo", **opts)
    assert isinstance(apo, APO) and apo.initial_prompt == "Answer {question}." and apo.beam_width == 3
    assert apo.optimizer.base_url == "http://opt/v1" and apo.optimizer.model == "big"
    with pytest.raises(typer.BadParameter):
        _build_algorithm("ppo", **opts)
