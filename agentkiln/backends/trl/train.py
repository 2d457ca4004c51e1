"""Train with TRL's trainers (SFTTrainer, DPOTrainer, GRPOTrainer) on AgentKiln's records.

Why TRL as a backend: it brings accelerate / DeepSpeed / FSDP multi-GPU training, which our
single-device learner does not. Everything that reaches TRL is the recorded token ids (see
datasets.py); TRL never generates (GRPO's `rollout_func` returns the recorded calls), and the
result is a peft adapter folder (or a full model with `lora=None`) the engine serves like the
learner's own output.

What TRL does with the recorded logprobs: it uses sampling logprobs only for its vLLM
importance correction, so TRL's GRPO takes its ratio against the policy being trained (ratio 1
at the first iteration): right for traces the same weights sampled, approximate for others.
Off-policy traces (production, older versions) are better served by our learner, whose ratio is
taken against the recorded logprobs with a cap (`GRPOConfig.max_importance_weight`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from agentkiln.algorithms.dpo.algorithm import PreferencePair
from agentkiln.backends.trl.config import TRLBackendConfig
from agentkiln.backends.trl.datasets import GRPOGroups, Prepared, dpo_rows, group_rollout, grpo_groups, sft_rows
from agentkiln.models import Transition
from agentkiln.training.config import ADAPTER_DIR

log = logging.getLogger(__name__)

RESULT_FILE = "trl_result.json"


@dataclasses.dataclass
class TRLResult:
    """One TRL run: what it trained on, what it left out and why, its logged metrics, the weights."""

    algorithm: str
    trained_on: int
    dropped: dict[str, int]
    metrics: list[dict[str, float]]
    adapter: str | None
    elapsed_s: float


def _device_args(config: TRLBackendConfig) -> dict[str, Any]:
    """accelerate's device and precision, chosen as our learner chooses them."""
    from agentkiln.hardware import bf16_is_fast
    from agentkiln.training.device import resolve_device

    device = resolve_device(config.device)
    bf16 = config.bf16 if config.bf16 is not None else bf16_is_fast(device.type)
    return {"use_cpu": device.type == "cpu", "bf16": bf16}


def _trl_args(config_cls: type, config: TRLBackendConfig, out: Path, **algorithm_args: Any) -> Any:
    """The TRL config: our few settings, the algorithm's, then the user's pass-through on top."""
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(config.args) - known)
    if unknown:
        raise ValueError(f"not fields of trl.{config_cls.__name__}: {', '.join(unknown)}")
    values = {
        "output_dir": str(out),
        "per_device_train_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "learning_rate": config.lr,
        "num_train_epochs": config.epochs,
        "seed": config.seed,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,  # quiet by default; TRL's metrics come back in TRLResult.metrics
        **_device_args(config),
        **algorithm_args,
        **config.args,
    }
    return config_cls(**values)


def _model_and_tokenizer(model_dir: str | Path, init_adapter: str | Path | None) -> tuple[Any, Any]:
    """Local safetensors only (never a hub id, never pickle), fp32 master weights like our learner;
    with `init_adapter` the model is that trainable peft adapter on the base (a warm start)."""
    from agentkiln.engine.model_files import load_model, load_tokenizer

    model = load_model(model_dir, "float32")
    if init_adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    model.train()
    return model, load_tokenizer(model_dir)


def _peft_config(config: TRLBackendConfig) -> Any:
    """TRL wraps the model in this adapter; None trains all weights (or an adapter already loaded)."""
    return config.lora.peft_config() if config.lora is not None else None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No third-party progress bars or deprecation noise: TRL's metrics come back in TRLResult."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TRL calls transformers' renamed checkpointing API
            warnings.filterwarnings("ignore", message="You are using 'rollout_func'")  # chosen knowingly: train.py doc
            yield
    finally:
        if bars:
            datasets.enable_progress_bars()


def _run(trainer: Any) -> None:
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # with tqdm off, Trainer prints every log dict
    trainer.train()


def _sft_trainer(data: Prepared, model: Any, tok: Any, config: TRLBackendConfig, out: Path) -> Any:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = _trl_args(SFTConfig, config, out, max_length=config.max_length, dataset_num_proc=None)
    return SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(data.rows), processing_class=tok,
        peft_config=_peft_config(config),
    )  # fmt: skip


def _dpo_trainer(data: Prepared, model: Any, tok: Any, config: TRLBackendConfig, out: Path) -> Any:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    class TokenDPOTrainer(DPOTrainer):
        """DPOTrainer on rows already holding prompt_ids / chosen_ids / rejected_ids.

        TRL's DPO data preparation always renders and tokenizes text; our rows are the recorded
        ids, which are exactly what its collator reads, so preparation is only the length filter.
        """

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if args.max_length is None:
                return dataset
            return dataset.filter(lambda row: len(row["prompt_ids"]) < args.max_length)

    extra = {"beta": config.beta} if config.beta is not None else {}
    args = _trl_args(DPOConfig, config, out, max_length=config.max_length, **extra)
    return TokenDPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(data.rows), processing_class=tok,
        peft_config=_peft_config(config),
    )  # fmt: skip


def _grpo_trainer(groups: GRPOGroups, model: Any, tok: Any, config: TRLBackendConfig, out: Path) -> Any:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def recorded_return(completions: list, kiln_return: list[float], **_: Any) -> list[float]:
        """The reward of each recorded call: its rollout's return (forwarded by rollout_func)."""
        return list(kiln_return)

    widest = max(len(t.response_ids) for calls in groups.groups.values() for t in calls)
    extra = {"beta": config.beta} if config.beta is not None else {}
    args = _trl_args(
        GRPOConfig, config, out,
        num_generations=groups.size,
        per_device_train_batch_size=groups.size * max(1, config.batch_size // groups.size),
        max_completion_length=widest,
        **extra,
    )  # fmt: skip
    return GRPOTrainer(
        model=model,
        reward_funcs=recorded_return,
        args=args,
        train_dataset=Dataset.from_list(groups.rows),
        processing_class=tok,
        peft_config=_peft_config(config),
        rollout_func=lambda prompts, trainer: group_rollout(groups, prompts),
    )


def _metrics(trainer: Any) -> list[dict[str, float]]:
    keep = (int, float)
    return [{k: float(v) for k, v in entry.items() if isinstance(v, keep)} for entry in trainer.state.log_history]


def train_with_trl(
    data: Sequence[Transition] | Sequence[PreferencePair],
    model_dir: str | Path,
    out_dir: str | Path,
    config: TRLBackendConfig | None = None,
    *,
    init_adapter: str | Path | None = None,
) -> TRLResult:
    """Train `config.algorithm` with TRL on transitions (sft, grpo) or preference pairs (dpo);
    save the weights in out_dir/adapter and the result in out_dir/trl_result.json.
    `init_adapter`: continue training that LoRA adapter instead of a fresh one."""
    config = config or TRLBackendConfig()
    started = time.monotonic()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.algorithm == "dpo":
        if any(not isinstance(p, PreferencePair) for p in data):
            raise TypeError("dpo trains on PreferencePair records (chosen, rejected)")
        prepared: Prepared | GRPOGroups = dpo_rows(data)  # type: ignore[arg-type]
    elif any(not isinstance(t, Transition) for t in data):
        raise TypeError(f"{config.algorithm} trains on Transition records")
    elif config.algorithm == "sft":
        prepared = sft_rows(data)  # type: ignore[arg-type]
    else:
        prepared = grpo_groups(data)  # type: ignore[arg-type]
    trained_on = prepared.trained_on
    adapter: str | None = None
    metrics: list[dict[str, float]] = []
    if trained_on:
        if init_adapter is not None and config.lora is None:
            raise ValueError("init_adapter continues a LoRA adapter: not with lora=None (full fine-tune)")
        model, tok = _model_and_tokenizer(model_dir, init_adapter)
        if init_adapter is not None:
            config = dataclasses.replace(config, lora=None)  # the loaded adapter is what trains
        build = {"sft": _sft_trainer, "dpo": _dpo_trainer, "grpo": _grpo_trainer}[config.algorithm]
        with tempfile.TemporaryDirectory(prefix="kiln-trl-") as scratch, _quiet():  # output_dir: logs only
            trainer = build(prepared, model, tok, config, Path(scratch))  # type: ignore[arg-type]
            _run(trainer)
            target = out / ADAPTER_DIR
            trainer.model.save_pretrained(str(target))
            if config.lora is None and init_adapter is None:
                tok.save_pretrained(str(target))
        metrics = _metrics(trainer)
        adapter = str(target)
    else:
        log.warning("trl %s: nothing to train on; left out: %s", config.algorithm, prepared.dropped)
    result = TRLResult(
        algorithm=config.algorithm,
        trained_on=trained_on,
        dropped=prepared.dropped,
        metrics=metrics,
        adapter=adapter,
        elapsed_s=round(time.monotonic() - started, 2),
    )
    (out / RESULT_FILE).write_text(json.dumps(dataclasses.asdict(result), indent=2))
    log.info("trl %s: trained on %d, left out %s, weights in %s", config.algorithm, trained_on, prepared.dropped,
             adapter)  # fmt: skip
    return result
