"""Semantic Kernel: a `ChatCompletionAgent` over a `Kernel` with an OpenAI chat service and a plugin.

The kernel holds an `OpenAIChatCompletion` service whose `AsyncOpenAI` client points at this
attempt's gateway route for the "solver" agent (`llm.for_agent(...)`), and a `CalculatorPlugin`
whose `@kernel_function` is offered to the model; `FunctionChoiceBehavior.Auto()` lets SK call it
and feed the result back until the model answers. `ai_model_id` is the name the agent is written
for (`llm.model`, e.g. gpt-4.1); the engine serves its own model whatever the name.
Run: `kiln run examples.semantic_kernel_agent:agent --server http://127.0.0.1:4747`.
"""

from __future__ import annotations

from typing import Annotated, Any

from openai import AsyncOpenAI
from semantic_kernel import Kernel
from semantic_kernel.agents import ChatCompletionAgent
from semantic_kernel.connectors.ai import FunctionChoiceBehavior
from semantic_kernel.connectors.ai.open_ai import OpenAIChatCompletion, OpenAIChatPromptExecutionSettings
from semantic_kernel.functions import KernelArguments, kernel_function

import agentkiln as kiln
from examples import common

AGENT_NAME = "solver"
MAX_TOOL_ROUNDS = 5  # SK's auto-invoke limit: model calls that may request tools before it must answer


class CalculatorPlugin:
    """Arithmetic for the agent (exposed to the model as CalculatorPlugin-calculate)."""

    @kernel_function(name="calculate", description="Evaluate an arithmetic expression such as '17 * 23'.")
    def calculate(self, expression: Annotated[str, "the expression to evaluate"]) -> str:
        return common.calculate(expression)  # @kiln.tool inside records failures as tool_error


def build_kernel(client: AsyncOpenAI, llm: kiln.LLMHandle) -> Kernel:
    kernel = Kernel()
    kernel.add_service(OpenAIChatCompletion(ai_model_id=llm.model, async_client=client, service_id=AGENT_NAME))
    kernel.add_plugin(CalculatorPlugin(), plugin_name="CalculatorPlugin")
    return kernel


def settings(llm: kiln.LLMHandle) -> OpenAIChatPromptExecutionSettings:
    """Auto function calling plus the published sampling options SK knows (temperature, max_tokens, ...)."""
    known = OpenAIChatPromptExecutionSettings.model_fields
    return OpenAIChatPromptExecutionSettings(
        service_id=AGENT_NAME,
        function_choice_behavior=FunctionChoiceBehavior.Auto(maximum_auto_invoke_attempts=MAX_TOOL_ROUNDS),
        **{k: v for k, v in llm.sampling.items() if k in known},
    )


@kiln.rollout
async def agent(task: Any, llm: kiln.LLMHandle) -> float:
    me = llm.for_agent(AGENT_NAME)
    client = AsyncOpenAI(base_url=me.base_url, api_key=me.api_key, max_retries=1)
    try:
        solver = ChatCompletionAgent(
            kernel=build_kernel(client, llm),
            name=AGENT_NAME,
            instructions=common.SYSTEM_PROMPT,
            arguments=KernelArguments(settings=settings(llm)),
        )
        response = await solver.get_response(messages=common.question(task))
        return common.score(str(response.message.content), task)
    finally:
        await client.close()
