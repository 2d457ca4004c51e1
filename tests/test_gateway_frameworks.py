"""Real agent frameworks, unchanged except for the base URL, through the gateway.

langchain-openai uses chat completions; the openai-agents SDK defaults to the Responses API.
Each must get the scripted answers and leave one span per LLM call in the store.
"""

from __future__ import annotations

import asyncio

import openai
import pytest

from agentkiln.engine.base import ChatRequest
from agentkiln.protocol import SpanAttrs, SpanNames
from agentkiln.store.memory import InMemoryStore
from tests.gateway_fakes import ScriptedEngine, ServedApp, gateway_app, tool_call_text


def policy(req: ChatRequest) -> str:
    last = req.messages[-1]
    if last["role"] == "tool":
        return f"Final: it is {last['content']}."
    if req.tools:
        return tool_call_text("get_weather", {"city": "Oslo"})
    return "Plain answer."


def get_weather_impl(city: str) -> str:
    return {"Oslo": "snowy"}.get(city, "unknown")


@pytest.fixture
def env():
    store = InMemoryStore(sweep_interval_s=None)
    with ServedApp(gateway_app(store, ScriptedEngine(policy))) as served:
        ar = served.call(store.start_rollout({"task": "fw"}))
        served.rid = ar.rollout.rollout_id
        served.store = store
        served.base_url = f"{served.url}/rollout/{ar.rollout.rollout_id}/attempt/{ar.attempt.attempt_id}/v1"
        yield served


def spans(env):
    return env.call(env.store.query_spans(env.rid, name=SpanNames.llm_call))


# --------------------------------------------------------------------------- langchain


def test_langchain_invoke_stream_and_tools(env):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Weather for a city."""
        return get_weather_impl(city)

    llm = ChatOpenAI(model="kiln-model", base_url=env.base_url, api_key="k", max_retries=0, temperature=0)
    assert llm.invoke("hello").content == "Plain answer."
    assert "".join(chunk.content for chunk in llm.stream("hello")) == "Plain answer."

    bound = llm.bind_tools([get_weather])
    history = [HumanMessage("Weather in Oslo?")]
    ai = bound.invoke(history)
    (call,) = ai.tool_calls
    assert call["name"] == "get_weather" and call["args"] == {"city": "Oslo"}
    history += [ai, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    assert bound.invoke(history).content == "Final: it is snowy."

    got = spans(env)
    assert len(got) == 4
    assert got[2].attributes[SpanAttrs.finish_reason] == "tool_calls"
    assert got[3].attributes[SpanAttrs.request]["messages"][-1]["role"] == "tool"


# --------------------------------------------------------------------------- openai-agents


def _agents_setup(base_url: str):
    from agents import set_default_openai_client, set_tracing_disabled

    set_tracing_disabled(True)
    client = openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0)
    set_default_openai_client(client, use_for_tracing=False)
    return client


def _weather_agent(**kw):
    from agents import Agent, ModelSettings, function_tool

    @function_tool
    def get_weather(city: str) -> str:
        """Weather for a city."""
        return get_weather_impl(city)

    return Agent(
        name="weather-agent",
        instructions="Answer weather questions using the tool.",
        tools=[get_weather],
        model_settings=ModelSettings(extra_headers={"X-Kiln-Agent": "weather-agent"}),
        **kw,
    )


@pytest.mark.parametrize("streamed", [False, True])
def test_openai_agents_default_responses_api(env, streamed):
    from agents import Runner

    async def go():
        client = _agents_setup(env.base_url)
        try:
            agent = _weather_agent(model="kiln-model")
            if not streamed:
                return (await Runner.run(agent, "Weather in Oslo?")).final_output
            run = Runner.run_streamed(agent, "Weather in Oslo?")
            async for _ in run.stream_events():
                pass
            return run.final_output
        finally:
            await client.close()

    assert asyncio.run(go()) == "Final: it is snowy."
    got = spans(env)
    assert len(got) == 2
    assert all(s.attributes["kiln.llm.api"] == "responses" for s in got)
    assert all(s.attributes[SpanAttrs.agent_name] == "weather-agent" for s in got)
    assert got[0].attributes[SpanAttrs.request]["messages"][0]["role"] == "system"
    assert got[1].attributes[SpanAttrs.request]["messages"][-1]["role"] == "tool"


def test_openai_agents_chat_completions_model(env):
    from agents import OpenAIChatCompletionsModel, Runner

    async def go():
        client = _agents_setup(env.base_url)
        try:
            agent = _weather_agent(model=OpenAIChatCompletionsModel(model="kiln-model", openai_client=client))
            return (await Runner.run(agent, "Weather in Oslo?")).final_output
        finally:
            await client.close()

    assert asyncio.run(go()) == "Final: it is snowy."
    got = spans(env)
    assert len(got) == 2
    assert all(s.attributes["kiln.llm.api"] == "chat.completions" for s in got)
    assert got[0].attributes[SpanAttrs.finish_reason] == "tool_calls"


# --------------------------------------------------------------------------- autogen


def test_autogen_assistant_with_tool(env):
    from autogen_agentchat.agents import AssistantAgent
    from autogen_ext.models.openai import OpenAIChatCompletionClient

    async def get_weather(city: str) -> str:
        """Weather for a city."""
        return get_weather_impl(city)

    async def go():
        client = OpenAIChatCompletionClient(
            model="kiln-model",
            base_url=env.base_url,
            api_key="k",
            max_retries=0,
            model_info={
                "vision": False,
                "function_calling": True,
                "json_output": False,
                "family": "unknown",
                "structured_output": False,
            },
        )
        try:
            agent = AssistantAgent("weather", model_client=client, tools=[get_weather], reflect_on_tool_use=True)
            result = await agent.run(task="Weather in Oslo?")
            return result.messages[-1].content
        finally:
            await client.close()

    assert asyncio.run(go()) == "Final: it is snowy."
    got = spans(env)
    assert len(got) == 2
    assert got[0].attributes[SpanAttrs.finish_reason] == "tool_calls"
    assert got[1].attributes[SpanAttrs.request]["messages"][-1]["role"] == "tool"
