"""Structured outputs and forced tool calls by constrained decoding (xgrammar), on the tiny random model.

A random-init model never writes JSON on its own, so every answer here parses only because the
grammar masked its logits: each test fails with the constraint removed. Also: invalid schemas
are 400s, the recorded span ids are the constrained ones, and an upstream engine receives
response_format / text.format and the fields the gateway does not use (top_k, guided_*, ...).
"""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest
import torch
from pydantic import BaseModel, Field

from agentkiln.engine.embedded import TransformersEngine
from agentkiln.engine.model_files import tiny_model_dir
from agentkiln.engine.upstream.engine import UpstreamEngine
from agentkiln.protocol import LLMCall, SpanNames
from agentkiln.store.memory import InMemoryStore
from tests.gateway_fakes import ServedApp, gateway_app

pytest.importorskip("xgrammar")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "member"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER, "strict": True}},
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
            "strict": True,
        },
    },
]
USER = [{"role": "user", "content": "Describe a person."}]


@pytest.fixture(scope="module")
def env():
    engine = TransformersEngine(tiny_model_dir(), model_name="tiny", dtype="float32", num_threads=1)
    store = InMemoryStore(sweep_interval_s=None)
    with ServedApp(gateway_app(store, engine)) as served:
        ar = served.call(store.start_rollout({"task": "s"}))
        served.rid = ar.rollout.rollout_id
        base = f"{served.url}/rollout/{served.rid}/attempt/{ar.attempt.attempt_id}/v1"
        served.client = openai.OpenAI(base_url=base, api_key="x", max_retries=0, timeout=60)
        served.store, served.engine = store, engine
        yield served
        served.client.close()
        served.call(engine.close(), timeout=30)


def last_call(env, count: int) -> LLMCall:
    """The newest recorded llm call, once `count` calls are recorded (spans are written after the answer)."""
    give_up = time.monotonic() + 10
    while True:
        spans = env.call(env.store.query_spans(env.rid, name=SpanNames.llm_call))
        if len(spans) >= count or time.monotonic() > give_up:
            break
        time.sleep(0.05)
    assert len(spans) >= count
    return LLMCall.from_span(spans[-1])


def spans_now(env) -> int:
    return len(env.call(env.store.query_spans(env.rid, name=SpanNames.llm_call)))


def assert_recorded(env, before: int, text: str) -> None:
    call = last_call(env, before + 1)
    assert call.constrained is True
    assert env.engine.tokenizer.decode(call.response_ids, skip_special_tokens=True) == text
    assert len(call.logprobs) == len(call.response_ids) and all(lp <= 0.0 for lp in call.logprobs)


def test_json_schema_chat_completion(env):
    before = spans_now(env)
    resp = env.client.chat.completions.create(
        model="tiny", messages=USER, response_format=PERSON_FORMAT, max_tokens=80, seed=1
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert_recorded(env, before, choice.message.content)


def test_recorded_logprobs_are_the_models_own(env):
    """Sampled under the mask, recorded unmasked: what the learner recomputes from prompt + response."""
    before = spans_now(env)
    env.client.chat.completions.create(
        model="tiny", messages=USER, response_format=PERSON_FORMAT, max_tokens=80, seed=1, temperature=0.7
    )
    call = last_call(env, before + 1)
    ids = torch.tensor([call.prompt_ids + call.response_ids])
    with torch.inference_mode():
        logits = env.engine._model(ids).logits[0, len(call.prompt_ids) - 1 : -1].float() / 0.7
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(call.response_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(call.logprobs), expected, atol=1e-4)
    assert expected[0] < -1.0  # the forced "{" is unlikely for the model itself (masked it would be 0)


def test_json_schema_streamed(env):
    before = spans_now(env)
    stream = env.client.chat.completions.create(
        model="tiny", messages=USER, response_format=PERSON_FORMAT, max_tokens=80, seed=2, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), PERSON)
    assert_recorded(env, before, text)


def test_responses_text_format(env):
    before = spans_now(env)
    fmt = {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
    resp = env.client.responses.create(
        model="tiny", input="Describe a person.", text={"format": fmt}, max_output_tokens=80
    )
    jsonschema.validate(json.loads(resp.output_text), PERSON)
    assert resp.text.format.type == "json_schema"
    assert_recorded(env, before, resp.output_text)
    stream = env.client.responses.create(
        model="tiny", input="Describe a person.", text={"format": fmt}, max_output_tokens=80, stream=True
    )
    done = [e for e in stream if e.type == "response.completed"]
    jsonschema.validate(json.loads(done[0].response.output_text), PERSON)


def test_json_object_parses(env):
    """Random weights never close a free string, so this model is nudged towards `"` and `}` (still not JSON alone)."""
    tok = env.engine.tokenizer
    boost = [i for t in ('"', "}", '"}', '",') for i in [tok.convert_tokens_to_ids(t)] if isinstance(i, int)]

    def nudge(_module, _inputs, logits):
        logits[..., boost] += 12.0
        return logits

    handle = env.engine._model.lm_head.register_forward_hook(nudge)
    try:
        before = spans_now(env)
        resp = env.client.chat.completions.create(
            model="tiny", messages=USER, response_format={"type": "json_object"}, max_tokens=120, seed=3
        )
    finally:
        handle.remove()
    content = resp.choices[0].message.content
    assert isinstance(json.loads(content), dict), content
    assert_recorded(env, before, content)


@pytest.mark.parametrize(
    ("tool_choice", "names"),
    [("required", {"get_weather", "get_time"}), ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})],
)
def test_forced_tool_call(env, tool_choice, names):
    before = spans_now(env)
    resp = env.client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, tool_choice=tool_choice, max_tokens=80, seed=4
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name in names
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), schema)
    assert last_call(env, before + 1).constrained is True


def test_forced_tool_call_streamed(env):
    stream = env.client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, tool_choice="required", max_tokens=80, seed=4, stream=True
    )
    chunks = [c for c in stream if c.choices]
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    name = "".join(tc.function.name or "" for tc in calls if tc.function)
    arguments = "".join(tc.function.arguments or "" for tc in calls if tc.function)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)
    jsonschema.validate(json.loads(arguments), schema)


def test_responses_forced_tool_call(env):
    tools = [{"type": "function", **t["function"]} for t in TOOLS]
    resp = env.client.responses.create(
        model="tiny", input="What time is it?", tools=tools, tool_choice="required", max_output_tokens=80
    )
    (call,) = [item for item in resp.output if item.type == "function_call"]
    schema = next(t["parameters"] for t in tools if t["name"] == call.name)
    jsonschema.validate(json.loads(call.arguments), schema)


def test_named_tool_must_exist(env):
    choice = {"type": "function", "function": {"name": "no_such_tool"}}
    with pytest.raises(openai.BadRequestError) as info:
        env.client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice=choice, max_tokens=5)
    assert "no_such_tool" in str(info.value)


def test_grammars_are_compiled_once_per_schema(env):
    schema = {**PERSON, "properties": {**PERSON["properties"], "name": {"type": "string", "maxLength": 5}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "short", "schema": schema, "strict": True}}
    compiles = env.engine.grammars.compiles
    for seed in (5, 6):
        resp = env.client.chat.completions.create(
            model="tiny", messages=USER, response_format=fmt, max_tokens=80, seed=seed
        )
        jsonschema.validate(json.loads(resp.choices[0].message.content), schema)
    assert env.engine.grammars.compiles == compiles + 1


@pytest.mark.parametrize(
    ("response_format", "contains"),
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}, "invalid json schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": "not a schema"}}, "must be a json schema"),
        ({"type": "yaml"}, "unsupported format type"),
    ],
)
def test_invalid_formats_are_400(env, response_format, contains):
    with pytest.raises(openai.BadRequestError) as info:
        env.client.chat.completions.create(model="tiny", messages=USER, response_format=response_format, max_tokens=5)
    assert contains in str(info.value).lower()


def test_unconstrained_calls_are_not_marked(env):
    before = spans_now(env)
    env.client.chat.completions.create(model="tiny", messages=USER, max_tokens=3)
    assert last_call(env, before + 1).constrained is False


# --------------------------------------------------------------------------- upstream pass-through


def test_upstream_gets_formats_and_unused_fields_unchanged():
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        message = {"role": "assistant", "content": '{"ok": true}'}
        return httpx.Response(200, json={"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})

    engine = UpstreamEngine("http://fake/v1", model="m", transport=httpx.MockTransport(handler))
    store = InMemoryStore(sweep_interval_s=None)
    extra = {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "guided_choice": ["a", "b"]}
    with (
        ServedApp(gateway_app(store, engine)) as served,
        openai.OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0) as client,
    ):
        client.chat.completions.create(
            model="m",
            messages=USER,
            response_format=PERSON_FORMAT,
            logit_bias={"42": -5},
            presence_penalty=0.5,
            frequency_penalty=0.25,
            seed=7,
            extra_body=extra,
        )
        fmt = {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
        client.responses.create(model="m", input="hi", text={"format": fmt}, extra_body={"top_k": 3})
        client.chat.completions.create(model="m", messages=USER, response_format={"type": "json_object"})
    chat, responses, json_object = seen
    assert chat["response_format"] == PERSON_FORMAT
    assert chat["logit_bias"] == {"42": -5} and chat["seed"] == 7
    assert chat["presence_penalty"] == 0.5 and chat["frequency_penalty"] == 0.25
    assert {k: chat[k] for k in extra} == extra
    assert responses["response_format"] == PERSON_FORMAT and responses["top_k"] == 3
    assert "text" not in responses
    assert json_object["response_format"] == {"type": "json_object"}


# --------------------------------------------------------------------------- LangChain with_structured_output


class Person(BaseModel):
    """A person (LangChain sends this model as the response schema or as the one tool)."""

    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=150)
    member: bool


@pytest.mark.parametrize(
    ("kwargs", "constrained_by"),
    [({}, "response_format"), ({"method": "json_schema"}, "response_format"), ({"method": "function_calling"}, "tool")],
    ids=["default", "json_schema", "function_calling"],
)
def test_langchain_with_structured_output(env, kwargs, constrained_by):
    """`ChatOpenAI.with_structured_output(Person)` parses from the random model: the grammar made it schema-valid."""
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        model="gpt-4.1", base_url=str(env.client.base_url), api_key="x", max_retries=0, max_tokens=80, seed=8
    )
    before = spans_now(env)
    out = chat.with_structured_output(Person, include_raw=True, **kwargs).invoke("Describe a person.")
    assert out["parsing_error"] is None and isinstance(out["parsed"], Person), out
    call = last_call(env, before + 1)
    assert call.constrained is True
    if constrained_by == "tool":  # LangChain forces its one tool: tool_choice names it
        (tool_call,) = out["raw"].tool_calls
        assert tool_call["name"] == "Person" and Person(**tool_call["args"]) == out["parsed"]
        assert call.request["tool_choice"] == {"type": "function", "function": {"name": "Person"}}
    else:
        assert call.request["structured"]["type"] == "json_schema"
        assert Person.model_validate_json(out["raw"].content) == out["parsed"]
