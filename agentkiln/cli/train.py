"""`kiln train` and `kiln export`: the algorithm side as its own process, against a running server."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, Optional

import typer

from agentkiln.cli.app import app
from agentkiln.cli.run import DEFAULT_SERVER

log = logging.getLogger(__name__)


def read_tasks(path: Path) -> list[Any]:
    """Tasks from JSONL (one JSON value a line) or a JSON list."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc}") from exc
    try:
        if text.lstrip().startswith("["):
            tasks = json.loads(text)
        else:
            tasks = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"{path}: not JSON/JSONL ({exc})") from exc
    if not tasks:
        raise typer.BadParameter(f"{path} holds no tasks")
    return tasks


# `kiln train` option -> dotted field of each algorithm's dataclasses (see training.settings).
# An option an algorithm does not list is ignored by it; `--set` reaches every other field.
TRAIN_OPTIONS: dict[str, dict[str, str]] = {
    "grpo": {
        "model_dir": "model_dir", "steps": "steps", "tasks_per_step": "tasks_per_step",
        "samples": "samples_per_task", "lr": "config.lr", "temperature": "temperature",
        "agent_match": "agent_match", "agents": "agents", "eval_every": "eval_every", "resume": "resume",
    },
    "sft": {
        "model_dir": "model_dir", "steps": "rounds", "tasks_per_step": "tasks_per_round",
        "samples": "samples_per_task", "lr": "config.lr", "temperature": "temperature",
        "agent_match": "agent_match", "eval_every": "eval_every", "min_reward": "min_reward",
    },
    "apo": {
        "prompt_name": "prompt_name", "prompt": "initial_prompt", "steps": "rounds", "beam": "beam_width",
        "tasks_per_step": "train_batch_size", "optimizer_url": "optimizer.base_url",
        "optimizer_model": "optimizer.model", "optimizer_key": "optimizer.api_key",
    },
    "gepa": {
        "prompt_name": "prompt_name", "prompt": "initial_prompt", "tasks_per_step": "config.reflection_minibatch_size",
        "optimizer_url": "optimizer.base_url",
        "optimizer_model": "optimizer.model", "optimizer_key": "optimizer.api_key",
    },
}
OFFLINE_OPTIONS: dict[str, tuple[str, ...]] = {
    "algorithm": ("algorithm",), "model_dir": ("model_dir",), "agent_match": ("agent_match",),
    "merge": ("merge_turns",), "min_reward": ("min_reward",), "top_k": ("top_k",), "epochs": ("epochs",),
    "lr": ("sft.lr", "grpo.lr", "trl.lr"), "temperature": ("grpo.temperature",), "backend": ("backend",),
}
SET_HELP = "KEY=VALUE for any field of the algorithm's dataclasses, e.g. config.kl_coef=0.05 (repeatable)"


def _algorithm_class(name: str) -> Any:
    if name == "grpo":
        from agentkiln.algorithms.grpo.algorithm import GRPO

        return GRPO
    if name == "sft":
        from agentkiln.algorithms.sft.algorithm import SFT

        return SFT
    if name == "apo":
        from agentkiln.algorithms.apo.algorithm import APO

        return APO
    if name == "gepa":
        from agentkiln.algorithms.gepa.algorithm import GEPA

        return GEPA
    raise typer.BadParameter(f"unknown algorithm {name!r}: use grpo, sft, apo or gepa", param_hint="--algorithm")


def _settings(pairs: Optional[list[str]]) -> dict[str, str]:
    from agentkiln.training.settings import parse_assignments

    try:
        return parse_assignments(pairs or [])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--set") from exc


def _build(cls: Any, values: dict[str, Any]) -> Any:
    from agentkiln.training.settings import build

    try:
        return build(cls, values)
    except (KeyError, TypeError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--set") from exc


@app.command("train")
def train(
    train_file: Path = typer.Argument(..., help="training tasks (JSONL or a JSON list)"),
    val_file: Optional[Path] = typer.Option(None, "--val", help="validation tasks"),
    algorithm: str = typer.Option(
        "grpo", help="grpo (RL), sft (imitate the best runs), apo or gepa (optimize a prompt; gepa's budget: "
        "--set config.max_metric_calls=N rollouts)"
    ),
    server: str = typer.Option(DEFAULT_SERVER, "--server", envvar="KILN_SERVER_URL"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="KILN_API_KEY"),
    model_dir: Optional[str] = typer.Option(None, help="weights the server's engine serves (default: SmolLM2)"),
    steps: int = typer.Option(20, help="GRPO steps / SFT and APO rounds"),
    tasks_per_step: int = typer.Option(2),
    samples: int = typer.Option(8, help="rollouts per task (GRPO group size, SFT samples per task)"),
    lr: float = typer.Option(1e-4),
    temperature: float = typer.Option(1.0),
    agent_match: Optional[str] = typer.Option(None, help="regex: train only these agents' LLM calls"),
    agents: Optional[str] = typer.Option(
        None, help="grpo: comma-separated agent names, each trained as its own LoRA (not with --agent-match)"
    ),
    eval_every: int = typer.Option(5),
    min_reward: float = typer.Option(1.0, help="sft: imitate rollouts with at least this reward"),
    prompt_name: str = typer.Option("system", help="apo, gepa: the prompt the agent reads from its `prompts`"),
    prompt: Optional[str] = typer.Option(None, help="apo, gepa: starting template or @file (default: the published)"),
    beam: int = typer.Option(2, help="apo: beam width"),
    optimizer_url: Optional[str] = typer.Option(None, help="apo, gepa: OpenAI-compatible URL of the optimizer LLM"),
    optimizer_model: Optional[str] = typer.Option(None, help="apo, gepa: optimizer model name"),
    optimizer_key: Optional[str] = typer.Option(None, envvar="KILN_OPTIMIZER_API_KEY"),
    run_dir: Path = typer.Option(Path("runs/train"), help="where history, checkpoints and results go"),
    resume: bool = typer.Option(True, help="grpo: continue from run_dir/checkpoint if present"),
    settings: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Train against a `kiln serve` server; runners are started separately with `kiln run`."""
    from agentkiln.trainer import Trainer

    if agents and algorithm != "grpo":
        raise typer.BadParameter("--agents (one LoRA per agent) is only supported by --algorithm grpo")
    algo = _build_algorithm(
        algorithm,
        model_dir=model_dir,
        steps=steps,
        tasks_per_step=tasks_per_step,
        samples=samples,
        lr=lr,
        temperature=temperature,
        agent_match=agent_match,
        agents=[a.strip() for a in agents.split(",") if a.strip()] if agents else None,
        eval_every=eval_every,
        resume=resume,
        min_reward=min_reward,
        prompt_name=prompt_name,
        prompt=prompt,
        beam=beam,
        optimizer_url=optimizer_url,
        optimizer_model=optimizer_model,
        optimizer_key=optimizer_key,
        settings=_settings(settings),
    )
    trainer = Trainer(algo, server_url=server, api_key=api_key, run_dir=run_dir)
    result = trainer.fit(None, read_tasks(train_file), read_tasks(val_file) if val_file else None)
    summary = {
        "algorithm": algorithm,
        "val_before": result.val_before,
        "val_after": result.val_after,
        "best_checkpoint": result.best_checkpoint,
        "steps": len(result.history),
    }
    if "best_prompt" in result.extra:
        summary["best_prompt"] = result.extra["best_prompt"]
    typer.echo(json.dumps(summary))


def _build_algorithm(name: str, settings: Optional[dict[str, str]] = None, **options: Any) -> Any:
    """The algorithm `name` with the named options mapped through TRAIN_OPTIONS, then `settings` (--set)."""
    cls = _algorithm_class(name)
    if name in ("apo", "gepa"):
        prompt = options.get("prompt")
        if prompt is not None and prompt.startswith("@"):
            options["prompt"] = Path(prompt[1:]).read_text()
        options["tasks_per_step"] = max(1, options.get("tasks_per_step", 1))
    values = {field: options[opt] for opt, field in TRAIN_OPTIONS[name].items() if opt in options}
    return _build(cls, {**values, **(settings or {})})


@app.command("train-offline")
def train_offline_cmd(
    store: str = typer.Option(
        ..., "--store", help="store to read traces from: runs/kiln.db, sqlite:///..., or a server URL"
    ),
    algorithm: str = typer.Option("sft", help="sft (imitate the best rollouts) or grpo (group advantages)"),
    out: Path = typer.Option(Path("runs/offline"), help="output folder: adapter/ and offline_result.json"),
    model_dir: Optional[str] = typer.Option(
        None, help="weights to fine-tune (default: SmolLM2); the traces' model for grpo"
    ),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="KILN_API_KEY"),
    mode: Optional[str] = typer.Option(None, help="only rollouts of this mode (train/val/test)"),
    agent_match: Optional[str] = typer.Option(None, help="regex on agent names"),
    merge: bool = typer.Option(False, help="merge turns whose token history continues"),
    min_reward: float = typer.Option(1.0, help="sft: imitate rollouts with at least this reward"),
    top_k: Optional[int] = typer.Option(None, help="sft: at most k rollouts per task"),
    epochs: int = typer.Option(1),
    lr: float = typer.Option(1e-4),
    temperature: float = typer.Option(1.0, help="grpo: the temperature the traces were sampled at"),
    limit: Optional[int] = typer.Option(None, help="read at most this many rollouts"),
    settings: Optional[list[str]] = typer.Option(
        None, "--set", help="KEY=VALUE for any OfflineConfig field, e.g. grpo.clip_eps=0.1 (repeatable)"
        " (with --source production: any ProductionTrainConfig field, e.g. dataset.pair_margin=0.5)"
    ),
    source: str = typer.Option(
        "rollouts", help="rollouts (finished rollouts and their rewards) or production (sessions rated by users)"
    ),
    since: Optional[str] = typer.Option(
        None, help="production: calls since this ISO time, unix timestamp or age (24h, 30m, 7d)"
    ),
    feedback_name: Optional[list[str]] = typer.Option(
        None, "--feedback-name", help="production: use only feedback with this name (repeatable; default all)"
    ),
    publish: Optional[str] = typer.Option(
        None, "--publish", help="publish the adapter to this server (or store): a served version (rollouts) or a "
        "candidate version for a canary (production)"
    ),
    backend: str = typer.Option(
        "kiln", help="kiln (our learner) or trl (TRL's SFT/DPO/GRPO trainers; --set trl.args.<field>=... for "
        "any TRL config field, e.g. trl.args.gradient_checkpointing=true)"
    ),
) -> None:
    """Train from rollouts already in a store, or (--source production) from users' feedback on
    deployed traffic: sft (well-rated answers), dpo (corrections, differently rated answers) or grpo."""
    from agentkiln.algorithms.offline import OfflineConfig, train_offline
    from agentkiln.training.trace import load_traces_from

    if source == "production":
        if mode is not None or limit is not None or top_k is not None or merge:
            raise typer.BadParameter("--mode, --limit, --top-k and --merge read rollouts; not with --source production")
        _train_production(
            store, out, api_key, since, publish,
            {
                "algorithm": algorithm, "model_dir": model_dir, "dataset.agent_match": agent_match,
                "dataset.min_reward": min_reward, "epochs": epochs, "sft.lr": lr, "dpo.lr": lr, "grpo.lr": lr,
                "grpo.temperature": temperature, "backend": backend, "trl.lr": lr,
                **({"dataset.names": tuple(feedback_name)} if feedback_name else {}),
                **_settings(settings),
            },
        )
        return
    if source != "rollouts":
        raise typer.BadParameter("use rollouts or production", param_hint="--source")
    if since is not None or feedback_name:
        raise typer.BadParameter("--since and --feedback-name need --source production")
    if algorithm not in ("sft", "grpo"):
        raise typer.BadParameter("use sft or grpo (dpo: with --source production)", param_hint="--algorithm")
    named = {
        "algorithm": algorithm, "model_dir": model_dir, "agent_match": agent_match, "merge": merge,
        "min_reward": min_reward, "top_k": top_k, "epochs": epochs, "lr": lr, "temperature": temperature,
        "backend": backend,
    }
    values = {field: named[opt] for opt, fields in OFFLINE_OPTIONS.items() for field in fields}
    config = _build(OfflineConfig, {**values, **_settings(settings)})
    traces = asyncio.run(load_traces_from(store, api_key=api_key, mode=mode, limit=limit))
    result = train_offline(traces, out, config)
    summary = {
        "rollouts": result.rollouts,
        "transitions": result.transitions,
        "trained_transitions": result.trained_transitions,
        "adapter": result.adapter,
        "skipped": result.skipped,
    }
    if publish is not None and result.adapter is not None:
        from agentkiln.production.train import publish_adapter_url

        meta = {"algorithm": algorithm, "backend": backend, "source": "offline"}
        summary["resources_id"] = asyncio.run(publish_adapter_url(publish, result.adapter, api_key, meta))
    typer.echo(json.dumps(summary))


def _train_production(
    store: str, out: Path, api_key: Optional[str], since: Optional[str], publish: Optional[str], values: dict[str, Any]
) -> None:
    """`kiln train-offline --source production`: train, write the report, print its summary."""
    from agentkiln.production.since import parse_since
    from agentkiln.production.train import ProductionTrainConfig, ProductionTrainResult, train_from_production_url

    if values["algorithm"] not in ("sft", "dpo", "grpo"):
        raise typer.BadParameter("use sft, dpo or grpo", param_hint="--algorithm")
    if since is None:
        raise typer.BadParameter("which calls to learn from: e.g. --since 24h", param_hint="--since")
    try:
        since_ts = parse_since(since)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from exc
    _build(ProductionTrainConfig, values)  # a bad setting fails here, before any store is read
    settings = {k: v for k, v in values.items() if k != "algorithm"}
    result = asyncio.run(
        train_from_production_url(
            store, since=since_ts, out_dir=out, api_key=api_key, algorithm=values["algorithm"],
            settings=settings, publish=publish,
        )
    )
    typer.echo(json.dumps(ProductionTrainResult.model_validate(result).summary()))


EXPORT_FORMATS = ("jsonl", "verl", "llamafactory")


@app.command("export")
def export(
    out: Path = typer.Argument(..., help="JSONL file (--format jsonl) or folder (verl, llamafactory) to write"),
    server: str = typer.Option(DEFAULT_SERVER, "--server", envvar="KILN_SERVER_URL"),
    store: Optional[str] = typer.Option(None, "--store", help="read a store directly (e.g. runs/kiln.db)"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="KILN_API_KEY"),
    mode: Optional[str] = typer.Option(None, help="only rollouts of this mode (train/val/test)"),
    agent_match: Optional[str] = typer.Option(None, help="regex on agent names"),
    merge: bool = typer.Option(False, help="merge turns whose token history continues"),
    fmt: str = typer.Option("jsonl", "--format", help="jsonl (transitions), verl (prompts.parquet + dataproto.npz), "
                            "llamafactory (sharegpt + dataset_info.json)"),
    pairs: str = typer.Option("none", help="llamafactory: 'group' adds preference pairs from differently rewarded "
                              "rollouts of one task"),
    min_reward: Optional[float] = typer.Option(None, help="llamafactory: SFT keeps rollouts rewarded at least this"),
    pad_token_id: int = typer.Option(0, help="verl: the id prompts and responses are padded with"),
) -> None:
    """Export finished rollouts for other trainers: RL transitions (JSONL), verl, or LLaMA-Factory datasets."""
    if fmt not in EXPORT_FORMATS:
        raise typer.BadParameter(f"{fmt!r}: use one of {', '.join(EXPORT_FORMATS)}", param_hint="--format")
    if pairs not in ("none", "group"):
        raise typer.BadParameter(f"{pairs!r}: use none or group", param_hint="--pairs")
    if fmt != "llamafactory" and (pairs != "none" or min_reward is not None):
        raise typer.BadParameter("--pairs and --min-reward belong to --format llamafactory", param_hint="--format")
    if fmt != "jsonl" and out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} is a file; --format {fmt} writes a folder", param_hint="OUT")
    traces = asyncio.run(_load(store or server, api_key, mode))
    try:
        message = _write_export(fmt, traces, out, agent_match=agent_match, merge=merge, pairs=pairs,
                                min_reward=min_reward, pad_token_id=pad_token_id)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(message)


def _write_export(fmt: str, traces: list[Any], out: Path, *, agent_match: Optional[str], merge: bool, pairs: str,
                  min_reward: Optional[float], pad_token_id: int) -> str:
    """Write `traces` in `fmt`; the line `kiln export` prints."""
    from agentkiln.adapter.formats.chat import run_calls
    from agentkiln.adapter.transitions import build_batch

    runs = [r for r in (run_calls(*t, agent_match=agent_match) for t in traces) if r is not None]
    if fmt == "llamafactory":
        from agentkiln.adapter.formats.llamafactory import write_llamafactory

        lf = write_llamafactory(runs, out, pairs=pairs, min_reward=min_reward)  # type: ignore[arg-type]
        return f"wrote {lf.sft} conversations and {lf.pairs} pairs to {out} (left out: {lf.skipped})"
    transitions, skipped = build_batch(traces, agent_match=agent_match, merge=merge)
    if fmt == "verl":
        from agentkiln.adapter.formats.verl import write_verl

        counts = write_verl(runs, transitions, out, pad_token_id=pad_token_id)
        return (f"wrote {counts['transitions']} transitions and {counts['prompts']} prompts to {out}"
                f" ({len(skipped)} LLM calls left out)")
    from agentkiln.adapter.export import write_jsonl

    n = write_jsonl(transitions, out)
    return f"wrote {n} transitions to {out} ({len(skipped)} LLM calls left out)"


async def _load(url: str, api_key: Optional[str], mode: Optional[str]):
    from agentkiln.training.trace import load_traces_from

    return await load_traces_from(url, api_key=api_key, mode=mode)
