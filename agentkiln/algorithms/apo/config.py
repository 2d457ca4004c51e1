"""APO's settings that are not search sizes: the optimizer LLM that critiques and rewrites prompts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agentkiln.training.context import TrainingContext

__all__ = ["OptimizerLLM"]


@dataclass
class OptimizerLLM:
    """Any OpenAI-compatible chat endpoint. None fields default to the kiln server's gateway (/v1)
    and the model it serves, so the engine being optimized can critique itself."""

    base_url: str | None = None
    model: str | None = None
    api_key: str | None = None
    temperature: float = 0.7
    max_tokens: int = 300
    timeout_s: float = 300.0

    def client(self, ctx: TrainingContext) -> Any:
        import openai

        base = self.base_url or ctx.server_url.rstrip("/") + "/v1"
        return openai.AsyncOpenAI(base_url=base, api_key=self.api_key or ctx.api_key or "kiln", timeout=self.timeout_s)

    async def ask(self, client: Any, ctx: TrainingContext, system: str, user: str) -> str:
        reply = await client.chat.completions.create(
            model=self.model or ctx.model_name,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
            temperature=self.temperature,
            max_tokens=self.max_tokens,
        )
        return reply.choices[0].message.content or ""
