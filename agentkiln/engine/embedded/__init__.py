"""The embedded transformers engine, split by job (like vLLM's engine): front end (engine), scheduler
thread (scheduler), KV tensor work (kv_ops), sampling and stops (sampler), incremental detokenizer,
weight sets (weights), per-sequence state (sequence) and the prefix KV cache."""

from agentkiln.engine.embedded.engine import TransformersEngine
from agentkiln.engine.embedded.scheduler import EngineStats

__all__ = ["EngineStats", "TransformersEngine"]
