"""Tool-calling round trips through the gateway with the openai SDK, and malformed tool calls."""

from __future__ import annotations

import json

import openai
import pytest

from agentkiln.engine.base import ChatRequest
from agentkiln.protocol import SpanAttrs, SpanNames
from agentkiln.store.memory import InMemoryStore
from tests.gateway_fakes import ScriptedEngine, ServedApp, gateway_app, tool_call_text

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def weather_policy(req: ChatRequest) -> str:
    """Call the tool once, then answer from its result."""
    last = req.messages[-1]
    if last["role"] == "tool":
        return f"It is {last['content']} in Paris."
    if req.tools:
        return tool_call_text("get_weather", {"city": "Paris"})
    return "I cannot check the weather."


def run_tool(name: str, arguments: str) -> str:
    assert name == "get_weather"
    return {"Paris": "sunny"}[json.loads(arguments)["city"]]


@pytest.fixture
def env():
    store = InMemoryStore(sweep_interval_s=None)
    engine = ScriptedEngine(weather_policy)
    with ServedApp(gateway_app(store, engine)) as served:
        ar = served.call(store.start_rollout({"task": "weather"}))
        served.rid = ar.rollout.rollout_id
        served.store, served.engine = store, engine
        served.client = openai.OpenAI(
            base_url=f"{served.url}/rollout/{ar.rollout.rollout_id}/attempt/{ar.attempt.attempt_id}/v1",
            api_key="k",
            max_retries=0,
        )
        yield served


def spans(env):
    return env.call(env.store.query_spans(env.rid, name=SpanNames.llm_call))


@pytest.mark.parametrize("stream", [False, True])
def test_chat_tool_round_trip(env, stream):
    c = env.client
    messages: list = [{"role": "user", "content": "Weather in Paris?"}]

    def ask():
        if not stream:
            return c.chat.completions.create(model="m", messages=messages, tools=[WEATHER_TOOL], tool_choice="auto")
        with c.chat.completions.stream(model="m", messages=messages, tools=[WEATHER_TOOL]) as s:
            return s.get_final_completion()

    first = ask()
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append(
        {"role": "tool", "tool_call_id": call.id, "content": run_tool(call.function.name, call.function.arguments)}
    )
    second = ask()
    assert second.choices[0].message.content == "It is sunny in Paris."
    assert second.choices[0].finish_reason == "stop"

    s1, s2 = spans(env)
    resp_call = s1.attributes[SpanAttrs.response]["choices"][0]["message"]["tool_calls"][0]
    assert resp_call["id"] == call.id and resp_call["function"]["name"] == "get_weather"
    assert s1.attributes[SpanAttrs.finish_reason] == "tool_calls"
    assert s1.attributes[SpanAttrs.request]["tools"][0]["function"]["name"] == "get_weather"
    sent = s2.attributes[SpanAttrs.request]["messages"]
    assert sent[1]["tool_calls"][0]["id"] == call.id
    assert sent[2] == {"role": "tool", "content": "sunny", "tool_call_id": call.id}


def test_malformed_tool_call_is_text_with_parse_error(env):
    env.engine._script = ['<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>']
    out = env.client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL]
    )
    msg = out.choices[0].message
    assert msg.tool_calls is None
    assert msg.content.startswith("<tool_call>")
    assert out.choices[0].finish_reason == "stop"
    (span,) = spans(env)
    assert "malformed tool call" in span.attributes[SpanAttrs.parse_error]
    assert span.status.code == "OK"


def test_legacy_functions_field(env):
    out = env.client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Weather?"}], functions=[WEATHER_TOOL["function"]]
    )
    assert out.choices[0].message.tool_calls[0].function.name == "get_weather"


@pytest.mark.parametrize("stream", [False, True])
def test_responses_tool_round_trip(env, stream):
    c = env.client
    tool = {"type": "function", **WEATHER_TOOL["function"]}
    items: list = [{"role": "user", "content": "Weather in Paris?"}]

    def ask():
        if not stream:
            return c.responses.create(model="m", input=items, tools=[tool])
        events = list(c.responses.create(model="m", input=items, tools=[tool], stream=True))
        assert events[-1].type == "response.completed"
        return events[-1].response

    first = ask()
    (fc,) = [o for o in first.output if o.type == "function_call"]
    assert fc.name == "get_weather"
    items += [o.model_dump(exclude_none=True) for o in first.output]
    items.append({"type": "function_call_output", "call_id": fc.call_id, "output": run_tool(fc.name, fc.arguments)})
    second = ask()
    assert second.output_text == "It is sunny in Paris."
    s1, s2 = spans(env)
    assert s1.attributes[SpanAttrs.finish_reason] == "tool_calls"
    sent = s2.attributes[SpanAttrs.request]["messages"]
    assert sent[1]["role"] == "assistant" and sent[1]["tool_calls"][0]["id"] == fc.call_id
    assert sent[2] == {"role": "tool", "tool_call_id": fc.call_id, "content": "sunny"}
