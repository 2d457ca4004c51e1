"""examples/semantic_kernel_agent.py: ChatCompletionAgent over a Kernel with a plugin, auto function calling."""

from __future__ import annotations

import pytest

from agentkiln.engine.base import ChatRequest
from agentkiln.models import FailureKind
from agentkiln.protocol import SpanAttrs
from examples import semantic_kernel_agent
from tests.gateway_fakes import ScriptedEngine, tool_call_text
from tests.test_frameworks_common import assert_continues, assert_recorded, last_tool_result, serving

TOOL = "CalculatorPlugin-calculate"  # SK names a plugin's function <plugin>-<function> for the model


@pytest.fixture
def kiln_server():
    yield from serving()


def sk_policy(expression: str = "17 * 23"):
    """Call the plugin's calculate(expression) once (by the name SK offered), then state its result."""

    def policy(req: ChatRequest) -> str:
        result = last_tool_result(req)
        if result is not None:
            return f"The answer is {result}."
        offered = [t["function"]["name"] for t in req.tools or []]
        assert offered == [TOOL], offered
        return tool_call_text(TOOL, {"expression": expression})

    return policy


async def test_kernel_agent_is_recorded(kiln_server):
    run = await kiln_server(ScriptedEngine(sk_policy())).run(
        semantic_kernel_agent.agent, sampling={"temperature": 0.3, "max_tokens": 200}, model="gpt-4.1"
    )
    assert_recorded(run, n_calls=2, agent="solver", reward=1.0)
    first, second = run.calls
    assert first.attributes[SpanAttrs.finish_reason] == "tool_calls"
    request = first.attributes[SpanAttrs.request]
    assert request["model"] == "gpt-4.1" and request["temperature"] == 0.3 and request["max_tokens"] == 200
    assert request["messages"][0]["role"] in ("system", "developer")
    assert request["tool_choice"] == "auto"
    # SK ran the kernel function and fed its result back as the tool message of the next call.
    tool_message = second.attributes[SpanAttrs.request]["messages"][-1]
    assert tool_message["role"] == "tool" and tool_message["content"] == "391"
    (tool,) = run.tool_spans
    assert SpanAttrs.failure_kind not in tool.attributes
    assert_continues(first, second)


async def test_failing_kernel_function_is_reported_to_the_model_and_recorded(kiln_server):
    run = await kiln_server(ScriptedEngine(sk_policy("1 / 0"))).run(semantic_kernel_agent.agent)
    assert run.attempt.status.value == "succeeded"  # SK hands the function's error to the model
    (tool,) = run.tool_spans
    assert tool.attributes[SpanAttrs.failure_kind] == FailureKind.tool_error.value
    assert "ZeroDivisionError" in tool.attributes[SpanAttrs.exception_message]
    assert run.rewards == [0.0]
