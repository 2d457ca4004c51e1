"""How a vLLM server is started and driven: parsed from `vllm:<model folder>[?options]`.

Options (query string): `port` (default: a free one), `dtype` (auto: bf16 where the device has
bf16 units, else float32, as for the embedded engine), `max_model_len` (2048), `max_loras` (4:
adapters in one batch), `max_cpu_loras` (16: adapters kept loaded), `max_lora_rank` (16, the
learner's default LoRA rank: vLLM pads every adapter to it and on CPU every call pays for the
padding, adapter or not, 3.5x on adapter calls from 64 to 16: bench/bench_vllm_lora.py),
`kv_cache_gb` (CPU KV space, 2), `gpu_memory_utilization` (GPU only, 0.85), `device` (auto: cuda
when torch sees one in this process, else cpu), `startup_timeout_s` (900), `python` (the
interpreter of the vLLM venv; default $KILN_VLLM_PYTHON, else .venv-vllm/bin/python),
`model_name` (the name kiln reports; default the folder's name), `arg` (repeatable: one more
command-line argument for vLLM, e.g. `arg=--enforce-eager`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

_INT_OPTIONS = ("port", "max_model_len", "max_loras", "max_cpu_loras", "max_lora_rank")
_FLOAT_OPTIONS = ("kv_cache_gb", "gpu_memory_utilization", "startup_timeout_s")
_STR_OPTIONS = ("dtype", "device", "python", "model_name")


def default_python() -> Path:
    """The vLLM venv's interpreter: $KILN_VLLM_PYTHON, else .venv-vllm/bin/python here or beside the package."""
    env = os.environ.get("KILN_VLLM_PYTHON")
    if env:
        return Path(env)
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        candidate = root / ".venv-vllm" / "bin" / "python"
        if candidate.exists():
            return candidate
    return Path(".venv-vllm/bin/python")


@dataclass
class VLLMOptions:
    """Everything kiln decides about the vLLM server it supervises (see the module doc)."""

    model_dir: Path
    model_name: str = ""
    port: int = 0
    host: str = "127.0.0.1"
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int = 2048
    max_loras: int = 4
    max_cpu_loras: int = 16
    max_lora_rank: int = 16
    kv_cache_gb: float = 2.0
    gpu_memory_utilization: float = 0.85
    startup_timeout_s: float = 900.0
    python: str = ""
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        self.model_name = self.model_name or self.model_dir.name
        self.python = self.python or str(default_python())
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras ({self.max_loras})")
        if self.max_loras < 1 or self.max_model_len < 16:
            raise ValueError("max_loras must be >= 1 and max_model_len >= 16")

    @classmethod
    def parse(cls, spec: str) -> VLLMOptions:
        """`<model folder>[?name=value&...]` (the part after `vllm:`); `smollm2` names the embedded model's folder."""
        folder, _, query = spec.partition("?")
        if not folder:
            raise ValueError("vllm engine spec needs a model folder: vllm:<folder>[?options]")
        if folder.lower() == "smollm2":
            from agentkiln.engine import model_files

            path = model_files.smollm2_dir()
            default_name = "smollm2-135m-instruct"
        else:
            path = Path(folder).expanduser()
            default_name = path.name
            if not path.is_dir():
                raise ValueError(f"vllm engine: {folder!r} is not a model folder")
        values = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
        known = set(_INT_OPTIONS + _FLOAT_OPTIONS + _STR_OPTIONS + ("arg",))
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"vllm engine: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        kwargs: dict[str, object] = {"model_dir": path, "model_name": default_name}
        for name, raw in values.items():
            value = raw[-1]
            try:
                if name in _INT_OPTIONS:
                    kwargs[name] = int(value)
                elif name in _FLOAT_OPTIONS:
                    kwargs[name] = float(value)
                elif name in _STR_OPTIONS:
                    kwargs[name] = value
            except ValueError:
                raise ValueError(f"vllm engine: option {name}={value!r} is not a number") from None
        kwargs["extra_args"] = list(values.get("arg", []))
        return cls(**kwargs)  # type: ignore[arg-type]
