"""vLLM as the engine: a supervised server (process), versioned LoRA adapters (adapters), token-in/out (engine).

Imported lazily: the upstream engine uses `adapters` alone, without the tokenizer stack `engine` needs.
"""

from __future__ import annotations

from typing import Any

__all__ = ["VLLMEngine", "VLLMOptions"]


def __getattr__(name: str) -> Any:
    if name == "VLLMEngine":
        from agentkiln.engine.vllm.engine import VLLMEngine

        return VLLMEngine
    if name == "VLLMOptions":
        from agentkiln.engine.vllm.options import VLLMOptions

        return VLLMOptions
    raise AttributeError(name)
