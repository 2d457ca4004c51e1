"""Build an engine from a one-string spec (CLI flag / config value).

Specs: "none" -> no engine; "smollm2" -> embedded SmolLM2-135M-Instruct (converted GGUF);
"tiny" -> the tiny random model (tests, demos of plumbing); "vllm" or "vllm:<model folder|smollm2>[?options]"
-> a vLLM server kiln starts and supervises, driven token-in/token-out (engine/vllm; options in
engine/vllm/options.py); "upstream:<base_url>[#model][?model_dir=<folder>&alias=<name>...]" -> an
OpenAI-compatible server someone else runs (API key from $KILN_UPSTREAM_API_KEY or $OPENAI_API_KEY):
with `model_dir` (the served model's folder, for its tokenizer and chat template) it is driven
token-in/token-out like a managed vLLM and loads adapters through vLLM's runtime LoRA API; without,
chat completions are forwarded (fallback tokenizer folder from $KILN_UPSTREAM_TOKENIZER). Either way
the model served is `#model`, whatever name the agent asks for, except names listed as `alias`
(`alias=gpt-4.1` passes that name through; `alias=gpt-4.1:my-lora` sends it as my-lora);
any existing directory -> embedded engine on that checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from agentkiln.engine.base import Engine


def build_engine(spec: str, **engine_kwargs: Any) -> Engine | None:
    """`engine_kwargs` go to TransformersEngine (dtype, max_batch_size, device, ...)."""
    spec = spec.strip()
    if spec.lower() in ("", "none"):
        return None
    if spec.startswith("upstream:"):
        return _upstream(spec[len("upstream:") :])
    if spec.lower() == "vllm":  # the embedded model's folder, served by vLLM
        spec = "vllm:smollm2"
    if spec.startswith("vllm:"):
        from agentkiln.engine.vllm import VLLMEngine, VLLMOptions

        return VLLMEngine.managed(VLLMOptions.parse(spec[len("vllm:") :]))

    from agentkiln.engine import model_files
    from agentkiln.engine.embedded import TransformersEngine

    if spec.lower() == "smollm2":
        return TransformersEngine(model_files.smollm2_dir(), **engine_kwargs)
    if spec.lower() == "tiny":
        engine_kwargs.setdefault("model_name", "tiny-random-llama")
        engine_kwargs.setdefault("dtype", "float32")
        return TransformersEngine(model_files.tiny_model_dir(), **engine_kwargs)
    path = Path(spec).expanduser()
    if path.is_dir():
        engine_kwargs.setdefault("model_name", path.name)
        return TransformersEngine(path, **engine_kwargs)
    raise ValueError(
        f"unknown engine spec {spec!r}: use none, smollm2, tiny, vllm:<model folder>[?options], "
        "upstream:<url>[#model][?model_dir=<folder>] or a model folder"
    )


def _upstream(rest: str) -> Engine:
    from agentkiln.engine.upstream import UpstreamEngine

    base_url, _, fragment = rest.partition("#")
    model, _, query = fragment.partition("?")
    if not base_url:
        raise ValueError("upstream spec needs a base URL: upstream:http://host:8000/v1[#model][?model_dir=<folder>]")
    options = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    unknown = sorted(set(options) - {"model_dir", "alias"})
    if unknown:
        raise ValueError(f"upstream spec: unknown option(s) {', '.join(unknown)}; known: alias, model_dir")
    aliases = dict(_alias(a) for a in options.get("alias", []))
    api_key = os.environ.get("KILN_UPSTREAM_API_KEY") or os.environ.get("OPENAI_API_KEY")
    model_dir = (options.get("model_dir") or [None])[-1]
    if model_dir:
        from agentkiln.engine.vllm import VLLMEngine

        if not Path(model_dir).expanduser().is_dir():
            raise ValueError(f"upstream spec: model_dir {model_dir!r} is not a folder")
        if aliases:
            raise ValueError("upstream spec: alias applies to forwarded chat calls, not to model_dir (token-level) mode")
        return VLLMEngine(
            base_url=base_url, model_dir=Path(model_dir).expanduser(), served_model=model or "default", api_key=api_key
        )
    tokenizer = None
    tok_dir = os.environ.get("KILN_UPSTREAM_TOKENIZER")  # folder; used only when the server returns no ids
    if tok_dir:
        from agentkiln.engine.model_files import load_tokenizer

        tokenizer = load_tokenizer(tok_dir)
    return UpstreamEngine(
        base_url, model=model or "default", api_key=api_key, tokenizer=tokenizer, model_aliases=aliases
    )


def _alias(value: str) -> tuple[str, str]:
    """`name` (passed through as is) or `name:upstream name`."""
    name, _, target = value.partition(":")
    if not name:
        raise ValueError(f"upstream spec: alias {value!r} names no model")
    return name, target or name
