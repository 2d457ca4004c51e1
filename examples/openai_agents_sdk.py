"""The OpenAI Agents SDK: an `Agent` with a `function_tool`, run by `Runner.run`.

`agent` uses the SDK's default model path (the Responses API); `agent_chat_completions` the
`OpenAIChatCompletionsModel`. Both pass a client whose base URL is this attempt's gateway route
for the "solver" agent through `RunConfig(model_provider=...)`, which is per run: workers running
attempts concurrently in one process must not share `set_default_openai_client`. Tracing to
OpenAI's servers is disabled.
Run: `kiln run examples.openai_agents_sdk:agent --server http://127.0.0.1:4747`.
"""

from __future__ import annotations

from typing import Any

from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, OpenAIProvider, RunConfig, Runner, function_tool
from openai import AsyncOpenAI

import agentkiln as kiln
from examples import common

AGENT_NAME = "solver"
MAX_TURNS = 6


@function_tool
def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression such as '17 * 23' and return the result."""
    return common.calculate(expression)  # @kiln.tool inside records failures as tool_error


def _settings(llm: kiln.LLMHandle) -> ModelSettings:
    keys = ("temperature", "top_p", "max_tokens")
    return ModelSettings(**{k: v for k, v in llm.sampling.items() if k in keys})


def build_agent(model: Any, llm: kiln.LLMHandle) -> Agent:
    return Agent(
        name=AGENT_NAME,
        instructions=common.SYSTEM_PROMPT,
        tools=[calculate],
        model=model,
        model_settings=_settings(llm),
    )


async def _run(task: Any, llm: kiln.LLMHandle, *, chat_completions: bool) -> float:
    me = llm.for_agent(AGENT_NAME)
    client = AsyncOpenAI(base_url=me.base_url, api_key=me.api_key, max_retries=1)
    try:
        if chat_completions:
            solver = build_agent(OpenAIChatCompletionsModel(model=llm.model, openai_client=client), llm)
            config = RunConfig(tracing_disabled=True)
        else:
            solver = build_agent(llm.model, llm)
            config = RunConfig(
                model_provider=OpenAIProvider(openai_client=client, use_responses=True), tracing_disabled=True
            )
        result = await Runner.run(solver, common.question(task), run_config=config, max_turns=MAX_TURNS)
        return common.score(str(result.final_output), task)
    finally:
        await client.close()


@kiln.rollout
async def agent(task: Any, llm: kiln.LLMHandle) -> float:
    """Default SDK path: Responses API."""
    return await _run(task, llm, chat_completions=False)


@kiln.rollout
async def agent_chat_completions(task: Any, llm: kiln.LLMHandle) -> float:
    """Same agent on the Chat Completions API."""
    return await _run(task, llm, chat_completions=True)
