"""What the gateway needs from an inference engine: chat in, tokens + logprobs out.

The interface is chat-level (messages + tools), not token-level, so an upstream
OpenAI-compatible server (vLLM returning token ids) and the embedded transformers
engine plug in the same way. Every result carries the exact token ids and the
sampling-time logprobs, because those are what RL training consumes.
"""

from __future__ import annotations

import abc
from typing import Any, AsyncIterator, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agentkiln.engine import limits


class StructuredOutput(BaseModel):
    """What the answer must be: any JSON object, or JSON following `json_schema` (OpenAI response_format)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["json_object", "json_schema"]
    name: str | None = Field(default=None, max_length=64)
    json_schema: dict[str, Any] | None = Field(default=None, description="the JSON schema (type json_schema)")
    strict: bool = False

    def response_format(self) -> dict[str, Any]:
        """The chat completions `response_format` this is (what an upstream server is sent)."""
        if self.type == "json_object":
            return {"type": "json_object"}
        inner: dict[str, Any] = {"name": self.name or "response", "schema": self.json_schema or {}}
        inner["strict"] = self.strict
        return {"type": "json_schema", "json_schema": inner}


class ChatRequest(BaseModel):
    """Normalised form of what OpenAI clients send (chat completions and responses API).

    Bounded as `engine.limits` says, so no engine sees a request that could overflow it (a seed
    beyond int64), stall it (thousands of long stop strings) or hog it (n x max_tokens).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    messages: list[dict[str, Any]] = Field(
        max_length=limits.MAX_MESSAGES, description="OpenAI chat messages (system/developer/user/assistant/tool)"
    )
    tools: list[dict[str, Any]] = Field(default_factory=list, description="OpenAI function tool definitions")
    tool_choice: Any = None
    max_tokens: Optional[int] = Field(
        default=None,
        ge=1,
        le=limits.MAX_TOKENS,
        description="None: until a stop or the context limit (at most `limits.unlimited_cap(n)` per choice)",
    )
    temperature: float = Field(default=1.0, ge=0.0, le=5.0, description="< GREEDY_BELOW_TEMPERATURE samples greedily")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=limits.MAX_STOP_STRINGS)
    n: int = Field(default=1, ge=1, le=limits.MAX_N)
    seed: Optional[int] = Field(default=None, ge=limits.INT64_MIN, le=limits.INT64_MAX)
    model: Optional[str] = None
    structured: StructuredOutput | None = Field(
        default=None, description="constrain the answer to JSON (response_format / text.format)"
    )
    passthrough: dict[str, Any] = Field(
        default_factory=dict,
        description="body fields the gateway does not act on (top_k, min_p, penalties, logit_bias, guided "
        "decoding options, ...): an upstream server gets them unchanged, the embedded engine ignores them",
    )
    agent: Optional[str] = Field(
        default=None,
        description="the calling agent (set by the gateway); engines holding that agent's own weights serve them",
    )
    variant: Optional[Literal["candidate"]] = Field(
        default=None,
        description="set by the gateway for a session in a canary's share: serve the candidate's weights when loaded",
    )

    @model_validator(mode="after")
    def _bounded(self) -> ChatRequest:
        problem = limits.stop_error(self.stop)
        if self.max_tokens is not None:
            problem = problem or limits.total_tokens_error(self.n, self.max_tokens)
        if problem:
            raise ValueError(problem)
        return self


class ToolCall(BaseModel):
    id: str
    name: str
    arguments: str = Field(description="JSON text, as OpenAI sends it")


class ChatChoice(BaseModel):
    """One sampled completion."""

    index: int = 0
    text: str = Field(description="assistant content with any parsed tool-call markup removed")
    raw_text: str = Field(description="exactly the decoded response tokens")
    tool_calls: list[ToolCall] = Field(default_factory=list)
    finish_reason: Literal["stop", "length", "tool_calls"] = "stop"
    response_ids: list[int] = Field(default_factory=list)
    logprobs: list[float] = Field(default_factory=list)
    parse_error: Optional[str] = Field(default=None, description="set when tool-call markup was malformed")
    constrained: bool = Field(
        default=False,
        description="sampled under a grammar (structured output / forced tool call); logprobs stay the model's own",
    )


class ChatResult(BaseModel):
    prompt_ids: list[int]
    prompt_text: Optional[str] = None
    choices: list[ChatChoice]
    model: str
    model_version: str


class StreamDelta(BaseModel):
    """Incremental output of one choice while streaming; the last delta carries `final`."""

    index: int = 0
    text: str = ""
    token_ids: list[int] = Field(default_factory=list)
    final: Optional[ChatResult] = None


class Engine(abc.ABC):
    """An inference backend. Implementations must be safe to call concurrently (batching is theirs)."""

    model_name: str

    @property
    @abc.abstractmethod
    def model_version(self) -> str:
        """Identifies the main weights now served (changes after load_weights)."""

    def version_for(self, agent: Optional[str]) -> str:
        """The version `agent`'s calls are served (its own weights if loaded, else the main ones)."""
        return self.model_version

    def weights_key(self, agent: Optional[str], variant: Optional[str] = None) -> Optional[str]:
        """The weight set a call is served by: for a canary's candidate, the candidate's set for this
        agent, else the candidate's main set (engine/weight_sync.candidate_key); else the agent's."""
        return agent

    @property
    def agent_versions(self) -> dict[str, str]:
        """Agent name -> version of that agent's own weights (empty: every agent gets the main weights)."""
        return {}

    def token_text(self, token_id: int) -> str:
        """The text of one token, for OpenAI logprobs entries ("" when the engine has no tokenizer)."""
        return ""

    @abc.abstractmethod
    async def chat(self, request: ChatRequest) -> ChatResult: ...

    @abc.abstractmethod
    def chat_stream(self, request: ChatRequest) -> AsyncIterator[StreamDelta]:
        """Yields deltas; must produce exactly the tokens `chat` would record (n must be 1)."""

    async def load_weights(self, path: str, version: str, agent: Optional[str] = None) -> None:
        """Swap in new weights (LoRA adapter folder or full checkpoint) without a restart.

        agent=None replaces the main weights; a name loads weights served only to that agent's calls.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot swap weights")

    async def unload_weights(self, agent: str) -> None:
        """Drop `agent`'s own weights: its calls get the main weights again."""
        raise NotImplementedError(f"{type(self).__name__} has no per-agent weights")

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None
