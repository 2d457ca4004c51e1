"""Training from production feedback: `train_from_production` in-process and `kiln train-offline --source production`."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agentkiln.engine.model_files import load_tokenizer, tiny_model_dir
from agentkiln.models import LLMEndpoint, ResourcesIn
from agentkiln.production.dataset import DatasetConfig
from agentkiln.production.train import ProductionTrainConfig, train_from_production
from agentkiln.store import open_store
from agentkiln.store.memory import InMemoryStore
from agentkiln.training.config import LoraSettings
from tests.production_data import NAME, WINDOW_START, fill_production

SMALL = {"lora": LoraSettings(r=2, alpha=4), "bf16": False}


@pytest.fixture(scope="module")
def tiny_dir() -> str:
    return str(tiny_model_dir())


@pytest.fixture(scope="module")
def store_db(tmp_path_factory, tiny_dir: str) -> Path:
    db = tmp_path_factory.mktemp("production") / "kiln.db"

    async def fill() -> None:
        store = open_store(str(db))
        try:
            await fill_production(store, load_tokenizer(tiny_dir))
        finally:
            await store.close()

    asyncio.run(fill())
    return db


async def test_train_from_production_publishes_a_candidate(tmp_path: Path, tiny_dir: str) -> None:
    from agentkiln.algorithms.dpo import DPOConfig

    store = InMemoryStore(sweep_interval_s=None)
    await fill_production(store, load_tokenizer(tiny_dir))
    deployed = await store.add_resources(ResourcesIn(llms={"main": LLMEndpoint(model="served", sampling={"temperature": 0.7})}))
    config = ProductionTrainConfig(algorithm="dpo", model_dir=tiny_dir, dataset=DatasetConfig(names=(NAME,)),
                                   dpo=DPOConfig(lr=1e-2, **SMALL))
    result = await train_from_production(store, WINDOW_START, config, tmp_path, publish=store)
    assert result.trained_on == 2 and result.metrics[0]["pairs"] == 2
    assert Path(result.adapter, "adapter_model.safetensors").exists()
    candidate = await store.get_resources(result.resources_id)
    main = candidate.llms["main"]
    assert candidate.candidate and main.adapter_path == str(Path(result.adapter).resolve())
    assert (main.model, main.sampling) == ("served", {"temperature": 0.7})  # only the weights differ
    assert candidate.metadata["baseline_resources_id"] == deployed.resources_id
    assert (await store.get_latest_resources()).resources_id == deployed.resources_id  # not deployed yet
    saved = json.loads((tmp_path / "production_result.json").read_text())
    assert saved["report"]["dpo"]["from_corrections"] == 1 and saved["resources_id"] == result.resources_id
    await store.close()


async def test_nothing_to_train_on_is_reported_not_raised(tmp_path: Path, tiny_dir: str) -> None:
    store = InMemoryStore(sweep_interval_s=None)
    result = await train_from_production(store, "1h", ProductionTrainConfig(model_dir=tiny_dir), tmp_path,
                                         publish=store)
    assert result.trained_on == 0 and result.adapter is None and result.resources_id is None
    assert await store.query_resources() == []
    await store.close()


@pytest.mark.parametrize("algorithm,trained", [("sft", 3), ("dpo", 2), ("grpo", 4)])
def test_kiln_train_offline_from_production(store_db: Path, tmp_path: Path, tiny_dir: str, algorithm: str,
                                            trained: int) -> None:
    import agentkiln.cli.train  # noqa: F401  (registers the command)
    from agentkiln.cli.app import app

    out = tmp_path / "out"
    res = CliRunner().invoke(app, [
        "train-offline", "--source", "production", "--store", str(store_db), "--since", "1h",
        "--algorithm", algorithm, "--out", str(out), "--model-dir", tiny_dir, "--lr", "1e-3",
        "--feedback-name", NAME, "--set", "sft.lora.r=2", "--set", "dpo.lora.r=2", "--set", "grpo.lora.r=2",
        "--publish", str(store_db),
    ])
    assert res.exit_code == 0, res.output
    summary = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("{")))
    assert summary["trained_on"] == trained and summary["sessions"] == 5
    assert summary["dropped"]["calls"] == {"no_feedback": 2, "redacted": 1}
    assert summary["dropped"]["feedback"]["unknown_label"] == 1
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    report = json.loads((out / "production_result.json").read_text())
    assert report["metrics"] and report["report"]["sft"]["dropped"] == {"below_threshold": 2}
    if algorithm == "grpo":  # the production default caps far-off-policy ratios
        assert "capped_frac" in report["metrics"][0]

    async def published() -> list:
        store = open_store(str(store_db))
        try:
            return [r for r in await store.query_resources() if r.resources_id == summary["resources_id"]]
        finally:
            await store.close()

    [candidate] = asyncio.run(published())
    assert candidate.candidate and candidate.metadata["algorithm"] == algorithm


def test_kiln_train_offline_from_production_with_trl_dpo(store_db: Path, tmp_path: Path, tiny_dir: str) -> None:
    """The same corrections and ratings trained by TRL's DPOTrainer (`--backend trl`), published as a candidate."""
    import agentkiln.cli.train  # noqa: F401
    from agentkiln.cli.app import app

    out = tmp_path / "out"
    res = CliRunner().invoke(app, [
        "train-offline", "--source", "production", "--store", str(store_db), "--since", "1h", "--backend", "trl",
        "--algorithm", "dpo", "--out", str(out), "--model-dir", tiny_dir, "--lr", "1e-3", "--feedback-name", NAME,
        "--set", "trl.lora.r=2", "--set", "trl.bf16=false", "--set", "warm_start=false", "--publish", str(store_db),
    ])
    assert res.exit_code == 0, res.output
    summary = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("{")))
    assert summary["trained_on"] == 2 and summary["resources_id"]
    assert json.loads((out / "trl_result.json").read_text())["algorithm"] == "dpo"
    assert (out / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("args,message", [
    (["--algorithm", "dpo"], "dpo: with --source production"),
    (["--source", "production"], "--since"),
    (["--source", "production", "--since", "yesterday"], "cannot read since"),
    (["--source", "production", "--since", "1h", "--mode", "train"], "not with --source production"),
    (["--since", "1h"], "need --source production"),
    (["--source", "production", "--since", "1h", "--set", "dataset.nope=1"], "no setting"),
])
def test_cli_explains_bad_production_options(store_db: Path, tmp_path: Path, args: list[str], message: str) -> None:
    import agentkiln.cli.train  # noqa: F401
    from agentkiln.cli.app import app

    res = CliRunner().invoke(app, ["train-offline", "--store", str(store_db), "--out", str(tmp_path), *args])
    assert res.exit_code != 0
    text = " ".join(re.sub("[│╭╮╰╯─]", " ", res.output).split())  # typer's error box, unwrapped
    assert message in text


async def test_a_candidate_starts_from_the_deployed_adapter(tmp_path: Path, tiny_dir: str) -> None:
    """warm_start: the learner begins at the deployed LoRA weights (a fresh adapter's B is zero)."""
    from safetensors.torch import load_file

    from agentkiln.algorithms.sft.config import SFTConfig
    from agentkiln.training.learner import Learner

    store = InMemoryStore(sweep_interval_s=None)
    await fill_production(store, load_tokenizer(tiny_dir))
    first = await train_from_production(
        store, WINDOW_START,
        ProductionTrainConfig(algorithm="sft", model_dir=tiny_dir, dataset=DatasetConfig(names=(NAME,)),
                              sft=SFTConfig(lr=1e-2, **SMALL)),
        tmp_path / "first",
    )  # fmt: skip
    await store.add_resources(ResourcesIn(llms={"main": LLMEndpoint(model="served", adapter_path=first.adapter)}))
    learner = Learner(tiny_dir, SFTConfig(**SMALL))
    learner.load_adapter(first.adapter)
    saved = load_file(str(Path(first.adapter) / "adapter_model.safetensors"))
    loaded = {k: v for k, v in learner.model.state_dict().items() if "lora_B" in k}
    assert any(v.abs().sum() > 0 for v in loaded.values()), "the deployed adapter's weights were loaded"
    assert sum(float(v.abs().sum()) for k, v in saved.items() if "lora_B" in k) == pytest.approx(
        sum(float(v.abs().sum()) for v in loaded.values()), rel=1e-5
    )

    calls: list[str] = []
    original = Learner.load_adapter

    def spy(self: Learner, folder: str) -> None:
        calls.append(str(folder))
        original(self, folder)

    Learner.load_adapter = spy  # type: ignore[method-assign]
    try:
        config = ProductionTrainConfig(algorithm="sft", model_dir=tiny_dir, dataset=DatasetConfig(names=(NAME,)),
                                       sft=SFTConfig(lr=1e-2, **SMALL))
        await train_from_production(store, WINDOW_START, config, tmp_path / "warm")
        await train_from_production(store, WINDOW_START, ProductionTrainConfig(**{**config.__dict__, "warm_start": False}),
                                    tmp_path / "cold")
    finally:
        Learner.load_adapter = original  # type: ignore[method-assign]
    assert calls == [first.adapter]
