"""Build an engine from a one-string spec (CLI flag / config value).

Specs: "none" -> no engine; "smollm2" -> embedded SmolLM2-135M-Instruct (converted GGUF);
"tiny" -> the tiny random model (tests, demos of plumbing); "upstream:<base_url>[#model]" ->
an OpenAI-compatible server (API key from $KILN_UPSTREAM_API_KEY or $OPENAI_API_KEY; optional
fallback tokenizer folder from $KILN_UPSTREAM_TOKENIZER);
any existing directory -> embedded engine on that checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from agentkiln.engine.base import Engine


def build_engine(spec: str, **engine_kwargs: Any) -> Engine | None:
    """`engine_kwargs` go to TransformersEngine (dtype, max_batch_size, device, ...)."""
    spec = spec.strip()
    if spec.lower() in ("", "none"):
        return None
    if spec.startswith("upstream:"):
        return _upstream(spec[len("upstream:") :])

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
    raise ValueError(f"unknown engine spec {spec!r}: use none, smollm2, tiny, upstream:<url>[#model] or a model folder")


def _upstream(rest: str) -> Engine:
    from agentkiln.engine.upstream import UpstreamEngine

    base_url, _, model = rest.partition("#")
    if not base_url:
        raise ValueError("upstream spec needs a base URL: upstream:http://host:8000/v1[#model]")
    tokenizer = None
    tok_dir = os.environ.get("KILN_UPSTREAM_TOKENIZER")  # folder; used only when the server returns no ids
    if tok_dir:
        from agentkiln.engine.model_files import load_tokenizer

        tokenizer = load_tokenizer(tok_dir)
    api_key = os.environ.get("KILN_UPSTREAM_API_KEY") or os.environ.get("OPENAI_API_KEY")
    return UpstreamEngine(base_url, model=model or "default", api_key=api_key, tokenizer=tokenizer)
