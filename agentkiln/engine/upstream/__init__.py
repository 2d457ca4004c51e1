"""Upstream engine: forwards chat calls to any OpenAI-compatible server (vLLM, SGLang, a hosted API).

`engine` builds requests and records token ids, `transport` does the HTTP (aiohttp; httpx for
injected test transports) and maps failures to `agentkiln.engine.errors`, `sse` parses streams.
"""

from agentkiln.engine.upstream.engine import UpstreamEngine

__all__ = ["UpstreamEngine"]
