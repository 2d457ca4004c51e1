"""Train a candidate version from production feedback: read the window, build the set, train, (publish).

The reusable entry `train_from_production` (in-process: the demo, a scheduled job) and
`kiln train-offline --source production` (agentkiln/cli/train.py) are the same code. The result
names the adapter and carries the data report (what was used, what was dropped and why); it is
written as JSON beside the adapter. Publishing makes a *candidate* resources version (never the
deployed one until a canary promotes it), with the deployed version's endpoint settings and
prompts, so the canary compares weights and nothing else.

The recorded token ids are reused as they are, so `model_dir` must be the model (family) that
served the traffic; GRPO's ratios are against the recorded log-probs of whatever version served
each call, capped by `GRPOConfig.max_importance_weight` (on by default here: production data is
off-policy by nature).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agentkiln.algorithms.dpo.config import DPOConfig
from agentkiln.algorithms.grpo.config import GRPOConfig
from agentkiln.algorithms.sft.config import SFTConfig
from agentkiln.backends import Backend, check_backend
from agentkiln.backends.trl.config import TRLBackendConfig
from agentkiln.models import LLMEndpoint, Resources, ResourcesIn
from agentkiln.production.dataset import DatasetConfig, DatasetReport, ProductionDataset, load_production_dataset
from agentkiln.production.since import parse_since
from agentkiln.store.base import Store
from agentkiln.training.config import ADAPTER_DIR

log = logging.getLogger(__name__)

RESULT_FILE = "production_result.json"
MAIN_LLM = "main"
DEFAULT_MAX_IMPORTANCE_WEIGHT = 3.0  # dual-clip PPO's usual c (Ye et al. 2020)

Algorithm = Literal["sft", "dpo", "grpo"]


@dataclass
class ProductionTrainConfig:
    """What to learn from production feedback and how.

    epochs: passes over the data; None keeps each algorithm's own (sft.epochs, dpo.epochs; GRPO 1).
    batch_size: GRPO transitions per update (SFT and DPO batch with their own batch_size).
    model: the model name the published candidate names (None: the deployed version's).
    warm_start: start from the deployed version's LoRA adapter when it has one (a candidate is the
        deployed model improved by the new feedback); False: a fresh adapter on the base model.
    backend: "kiln" (our learner, `sft` / `dpo` / `grpo` settings) or "trl" (TRL's trainers, `trl`
        settings; its GRPO takes no importance cap, see agentkiln/backends/trl/train.py).
    """

    algorithm: Algorithm = "sft"
    backend: Backend = "kiln"
    model_dir: str | None = None
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    epochs: int | None = None
    batch_size: int = 32
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=lambda: GRPOConfig(max_importance_weight=DEFAULT_MAX_IMPORTANCE_WEIGHT))
    model: str | None = None
    warm_start: bool = True
    trl: TRLBackendConfig = field(default_factory=TRLBackendConfig)

    def __post_init__(self) -> None:
        if self.algorithm not in ("sft", "dpo", "grpo"):
            raise ValueError(f"unknown algorithm {self.algorithm!r}: use sft, dpo or grpo")
        check_backend(self.backend)
        if self.epochs is not None and self.epochs < 1:
            raise ValueError("epochs must be at least 1")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")


class ProductionTrainResult(BaseModel):
    """What one training run on production data did (also written to out_dir/production_result.json)."""

    model_config = ConfigDict(extra="forbid")

    algorithm: Algorithm
    since: float
    trained_on: int = Field(description="SFT/GRPO transitions or DPO pairs trained on")
    adapter: str | None = None
    metrics: list[dict[str, float]] = Field(default_factory=list)
    report: DatasetReport
    resources_id: str | None = Field(default=None, description="the candidate version published")
    elapsed_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The few lines a person reads first: what was trained on, what was left out and why."""
        r = self.report
        return {
            "algorithm": self.algorithm,
            "sessions": r.sessions,
            "rated_calls": r.calls.used,
            "trained_on": self.trained_on,
            "sets": {"sft": r.sft.used, "dpo": r.dpo.used, "grpo": r.grpo.used},
            "dropped": {
                "calls": r.calls.dropped,
                "feedback": r.feedback.dropped,
                self.algorithm: getattr(r, self.algorithm).dropped,
            },
            "adapter": self.adapter,
            "resources_id": self.resources_id,
        }


def _train(
    config: ProductionTrainConfig, data: ProductionDataset, out: Path, init_adapter: str | None = None
) -> tuple[int, list[dict[str, float]], str | None]:
    """(examples trained on, metrics, adapter folder): the learner part, run off the event loop."""
    from agentkiln.engine.model_files import smollm2_dir
    from agentkiln.training.learner import Learner

    examples: list[Any] = {"sft": data.sft, "dpo": data.dpo, "grpo": data.grpo}[config.algorithm]
    if not examples:
        log.warning("production %s: nothing to train on (see the report's dropped counts)", config.algorithm)
        return 0, [], None
    model_dir = config.model_dir or smollm2_dir()
    if config.backend == "trl":
        return _train_trl(config, examples, model_dir, out, init_adapter)
    metrics: list[dict[str, float]] = []
    learner_config = {
        "sft": replace(config.sft, epochs=config.epochs or config.sft.epochs),
        "dpo": replace(config.dpo, epochs=config.epochs or config.dpo.epochs),
        "grpo": config.grpo,
    }[config.algorithm]
    learner = Learner(model_dir, learner_config)
    if init_adapter is not None and learner_config.lora is not None:
        try:
            learner.load_adapter(init_adapter)
            log.info("production %s: starting from the deployed adapter %s", config.algorithm, init_adapter)
        except (OSError, ValueError, RuntimeError) as exc:  # another LoRA layout, or not an adapter
            log.warning("production %s: cannot start from %s (%s); training a fresh adapter", config.algorithm,
                        init_adapter, exc)  # fmt: skip
    if config.algorithm == "sft":
        metrics.append(learner.update(data.sft))
    elif config.algorithm == "dpo":
        metrics.append(learner.update_pairs([p.as_tuple() for p in data.dpo]))
    else:
        for _ in range(config.epochs or 1):
            for i in range(0, len(data.grpo), config.batch_size):
                metrics.append(learner.update(data.grpo[i : i + config.batch_size]))
    return len(examples), metrics, str(learner.save(out / ADAPTER_DIR))


def _train_trl(
    config: ProductionTrainConfig, examples: list[Any], model_dir: Any, out: Path, init_adapter: str | None
) -> tuple[int, list[dict[str, float]], str | None]:
    """The same sets trained with TRL's trainers (warm-started from the deployed adapter as well)."""
    from agentkiln.backends.trl import train_with_trl

    trl_config = replace(config.trl, algorithm=config.algorithm, epochs=config.epochs or config.trl.epochs)
    if init_adapter is not None and trl_config.lora is None:
        init_adapter = None  # a full fine-tune starts from the base weights
    result = train_with_trl(examples, model_dir, out, trl_config, init_adapter=init_adapter)
    return result.trained_on, result.metrics, result.adapter


async def publish_candidate(
    store: Store,
    adapter: str | Path,
    *,
    model: str | None = None,
    metadata: dict[str, Any] | None = None,
    candidate: bool = True,
) -> Resources:
    """A candidate resources version serving `adapter` as the main weights (a canary can then try it);
    `candidate=False`: a plain new version, served to every call from then on.

    Everything else (the main endpoint's model name and sampling, other endpoints, prompts) is
    copied from the deployed version, so the new version differs in its weights only.
    """
    from agentkiln.engine.model_files import SMOLLM2_SUBDIR

    deployed = await store.get_latest_resources()
    main = deployed.main_llm() if deployed is not None else None
    llms = {k: v for k, v in (deployed.llms if deployed is not None else {}).items() if v is not main}
    llms[MAIN_LLM] = LLMEndpoint(
        model=model or (main.model if main is not None else SMOLLM2_SUBDIR),  # the engine's default name
        sampling=dict(main.sampling) if main is not None else {},
        adapter_path=str(Path(adapter).resolve()),
    )
    resources = await store.add_resources(
        ResourcesIn(
            candidate=candidate,
            llms=llms,
            prompts=deployed.prompts if deployed is not None else {},
            metadata={
                "source": "production",
                "baseline_resources_id": deployed.resources_id if deployed is not None else None,
                **(metadata or {}),
            },
        )
    )
    log.info("published %s %s (v%d) with adapter %s", "candidate" if candidate else "version", resources.resources_id,
             resources.version, adapter)  # fmt: skip
    return resources


async def publish_adapter_url(url: str, adapter: str | Path, api_key: str | None, metadata: dict[str, Any]) -> str:
    """Publish `adapter` as the served main weights on a server URL or store path; its resources id."""
    store = _open(url, api_key)
    try:
        return (await publish_candidate(store, adapter, metadata=metadata, candidate=False)).resources_id
    finally:
        await store.close()


async def train_from_production(
    store: Store,
    since: float | str,
    config: ProductionTrainConfig | None = None,
    out_dir: str | Path = "runs/production",
    *,
    publish: Store | None = None,
) -> ProductionTrainResult:
    """Train `config.algorithm` on production feedback since `since` (unix time, ISO time or an age
    like "24h"); save out_dir/adapter and out_dir/production_result.json; with `publish`, add the
    adapter there as a candidate version (its id in `resources_id`)."""
    from agentkiln.engine.model_files import load_tokenizer, smollm2_dir

    config = config or ProductionTrainConfig()
    started = time.monotonic()
    since_ts = parse_since(since)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(config.model_dir or smollm2_dir())
    data = await load_production_dataset(store, since_ts, config.dataset, tokenizer)
    init = None
    if config.warm_start:
        deployed = await store.get_latest_resources()
        main = deployed.main_llm() if deployed is not None else None
        init = main.adapter_path if main is not None else None
    trained_on, metrics, adapter = await asyncio.to_thread(_train, config, data, out, init)
    result = ProductionTrainResult(
        algorithm=config.algorithm,
        since=since_ts,
        trained_on=trained_on,
        adapter=adapter,
        metrics=metrics,
        report=data.report,
    )
    if adapter is not None and publish is not None:
        meta = {"algorithm": config.algorithm, "since": since_ts, "trained_on": trained_on}
        result.resources_id = (
            await publish_candidate(publish, adapter, model=config.model, metadata=meta)
        ).resources_id
    result.elapsed_s = round(time.monotonic() - started, 2)
    (out / RESULT_FILE).write_text(json.dumps(result.model_dump(mode="json"), indent=2))
    return result


def _open(url: str, api_key: str | None) -> Store:
    from agentkiln.store import open_store
    from agentkiln.store.client import HttpStore

    return HttpStore(url, api_key=api_key) if url.startswith(("http://", "https://")) else open_store(url)


async def train_from_production_url(
    url: str,
    *,
    since: float | str,
    out_dir: str | Path = "runs/production",
    api_key: str | None = None,
    algorithm: Algorithm = "sft",
    settings: dict[str, Any] | None = None,
    publish: str | None = None,
) -> dict[str, Any]:
    """`train_from_production` on a server URL or a store path; `settings` are dotted
    ProductionTrainConfig fields ("sft.lr", "dataset.names", ...); `publish` a server or store to
    publish the candidate to. Returns the result as a dict."""
    from agentkiln.training.settings import build

    config = build(ProductionTrainConfig, {"algorithm": algorithm, **(settings or {})})
    store = _open(url, api_key)
    target = None if publish is None else store if publish == url else _open(publish, api_key)
    try:
        result = await train_from_production(store, since, config, out_dir, publish=target)
    finally:
        await store.close()
        if target is not None and target is not store:
            await target.close()
    return result.model_dump(mode="json")
