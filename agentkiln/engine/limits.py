"""What one request may ask of an engine: the bounds of the engine contract (`ChatRequest`).

Every bound here keeps a hostile or buggy client from costing other clients: the gateway checks
them first (with the client's own field names in the 400), `ChatRequest` checks them again so a
caller that skips the gateway cannot get past them. The gateway's body-shape limits (JSON depth,
number ranges) are in `agentkiln.gateway.limits`.
"""

from __future__ import annotations

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# Stop strings are matched after every token against a tail window as long as the longest one,
# so the per-token cost is O(count * longest): 16 x 256 characters keeps it well under 0.1 ms.
# (OpenAI allows 4; vLLM has no bound.)
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256

MAX_TOKENS = 32_768  # max_tokens / max_completion_tokens / max_output_tokens of one choice
MAX_N = 64  # choices per request
# n x max_tokens: what one request may make the engine generate (64 choices of 1,024 tokens).
MAX_TOTAL_TOKENS = 65_536

MAX_MESSAGES = 2_048  # messages (chat) or input items (responses) of one request
# The text of all messages and tool definitions together. A prompt this long is far beyond any
# served model's context; the bound only keeps templating and tokenizing a body cheap.
MAX_PROMPT_CHARS = 4_000_000

# Temperatures below this sample from logits scaled by > 1e5, where float32 overflows to inf/NaN;
# they are served greedily (the limit of sampling as temperature -> 0), not rejected, because
# clients use tiny temperatures to ask for "deterministic".
GREEDY_BELOW_TEMPERATURE = 1e-5


def total_tokens_error(n: int, max_tokens: int) -> str | None:
    """Why n x max_tokens is too much, or None."""
    if n * max_tokens > MAX_TOTAL_TOKENS:
        return f"n x max_tokens is {n} x {max_tokens} = {n * max_tokens}, over the limit of {MAX_TOTAL_TOKENS} tokens"
    return None


def unlimited_cap(n: int) -> int:
    """Tokens per choice when the client sets no limit: the context bounds it, and so does n x this."""
    return min(MAX_TOKENS, MAX_TOTAL_TOKENS // max(n, 1))


def stop_error(stop: list[str]) -> str | None:
    """Why a stop list is out of bounds, or None."""
    if len(stop) > MAX_STOP_STRINGS:
        return f"at most {MAX_STOP_STRINGS} stop strings are allowed (got {len(stop)})"
    for i, s in enumerate(stop):
        if len(s) > MAX_STOP_CHARS:
            return f"stop string {i} has {len(s)} characters; the limit is {MAX_STOP_CHARS}"
    return None
