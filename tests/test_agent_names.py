"""The agent-name map (gateway/agent_names.py): its rules, where it sits in the resolution order,
and that `create_app` / `serve_async` / `kiln serve --agent-name` / `Trainer(agent_names=...)` get
it to the gateway, which records the name on the call's span."""

from __future__ import annotations

import asyncio
import re

import openai
import pytest
from typer.testing import CliRunner

import agentkiln as kiln
from agentkiln.adapter.transitions import build_transitions
from agentkiln.gateway import agent_names as names_mod
from agentkiln.gateway.agent_names import AgentNames
from agentkiln.gateway.recording import resolve_agent_name
from agentkiln.protocol import SpanAttrs, SpanNames
from agentkiln.server.app import create_app
from agentkiln.store.client import HttpStore
from agentkiln.store.memory import InMemoryStore
from tests.gateway_fakes import ScriptedEngine
from tests.test_frameworks_common import serving

CRITIC = "Say APPROVE if the draft is right, otherwise explain the mistake."
WRITER = "You write a short draft answer."


def sys(text, **extra):
    return {"role": "system", "content": text, **extra}


def user(text, **extra):
    return {"role": "user", "content": text, **extra}


# --------------------------------------------------------------------------- the map


def test_rules_keep_their_order_and_the_first_match_wins():
    names = AgentNames({"APPROVE": "critic", "^Say": "sayer"})
    assert names.name_for([sys(CRITIC)]) == "critic"
    assert AgentNames([("^Say", "sayer"), ("APPROVE", "critic")]).name_for([sys(CRITIC)]) == "sayer"
    assert names.name_for([sys(WRITER)]) is None


def test_rules_search_system_and_developer_messages_only():
    names = AgentNames({"^Say APPROVE": "critic"})
    assert names.name_for([{"role": "developer", "content": CRITIC}, user("hi")]) == "critic"
    assert names.name_for([sys(WRITER), user(CRITIC)]) is None  # a user message quoting the prompt
    assert names.name_for([{"role": "assistant", "content": CRITIC}]) is None
    assert names.name_for([sys(WRITER), sys(CRITIC)]) == "critic"  # any system message
    assert names.name_for([{"role": "system", "content": None}]) is None


def test_search_is_bounded_to_the_start_of_each_message():
    names = AgentNames({"APPROVE": "critic"})
    assert names.name_for([sys("x" * (names_mod.MAX_SEARCH_CHARS - 7) + "APPROVE")]) == "critic"
    assert names.name_for([sys("x" * names_mod.MAX_SEARCH_CHARS + "APPROVE")]) is None


def test_search_is_bounded_to_the_first_prompt_messages():
    """Only the first MAX_SEARCH_MESSAGES system/developer messages count: a body of many costs no more."""
    names = AgentNames({"APPROVE": "critic"})
    padding = [sys(WRITER), user(CRITIC)] * (names_mod.MAX_SEARCH_MESSAGES - 1)
    assert names.name_for([*padding, sys(CRITIC)]) == "critic"  # the 16th system message
    assert names.name_for([*padding, sys(WRITER), sys(CRITIC)]) is None  # the 17th


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"(unclosed": "critic"}, "bad regex '(unclosed'"),
        ({"^Say": "has space"}, "agent name must be 1-128 characters"),
        ({"^Say": ""}, "agent name must be 1-128 characters"),
        ({"": "critic"}, "non-empty string"),
        ({"x" * (names_mod.MAX_PATTERN_CHARS + 1): "critic"}, "at most 1000"),
        ({f"^p{i}$": f"a{i}" for i in range(names_mod.MAX_RULES + 1)}, f"at most {names_mod.MAX_RULES}"),
        ([("^Say",)], "each rule is (regex, name)"),
    ],
)
def test_bad_rules_are_refused_with_a_clear_message(rules, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        AgentNames(rules)


def test_cli_form_splits_at_the_last_equals_sign():
    names = AgentNames.from_cli(["^a=b=critic", "^You write=writer"])
    assert [(r.pattern.pattern, r.name) for r in names.rules] == [("^a=b", "critic"), ("^You write", "writer")]
    for bad in ("no-equals", "=critic"):
        with pytest.raises(ValueError, match="REGEX=NAME"):
            AgentNames.from_cli([bad])


# --------------------------------------------------------------------------- resolution order


def test_resolution_order_puts_the_map_after_metadata_and_before_user_and_message_names():
    names = AgentNames({"^Say APPROVE": "critic"})
    msgs = [sys(CRITIC, name="sys-name"), user("draft", name="writer")]
    assert resolve_agent_name({}, {}, None, msgs, path_agent="p", agent_names=names) == "p"
    assert resolve_agent_name({"x-kiln-agent": "h"}, {"agent": "m"}, "u", msgs, agent_names=names) == "h"
    assert resolve_agent_name({}, {"agent": "m"}, "u", msgs, agent_names=names) == "m"
    assert resolve_agent_name({}, {}, "u", msgs, agent_names=names) == "critic"
    assert resolve_agent_name({}, {}, "u", msgs) == "u"  # without a map the order is as before
    assert resolve_agent_name({}, None, None, msgs) == "sys-name"
    # No rule matches: the sources after the map still name the call.
    other = [sys(WRITER, name="sys-name")]
    assert resolve_agent_name({}, {}, "u", other, agent_names=names) == "u"
    assert resolve_agent_name({}, {}, None, other, agent_names=names) == "sys-name"
    # A user message's name is who said that message, never the caller's name.
    assert resolve_agent_name({}, None, None, [sys(WRITER), user("draft", name="writer")]) is None


# --------------------------------------------------------------------------- through the gateway


@pytest.fixture
def kiln_server():
    yield from serving()


@kiln.rollout
async def three_calls(task, llm):
    """A chat call as the critic, a Responses call whose instructions are the critic's, an unnamed chat call."""
    client = openai.AsyncOpenAI(base_url=llm.base_url, api_key=llm.api_key or "x", max_retries=0)
    await client.chat.completions.create(model=llm.model, messages=[sys(CRITIC), user("draft")])
    await client.responses.create(model=llm.model, instructions=CRITIC, input="draft")
    await client.chat.completions.create(model=llm.model, messages=[sys(WRITER), user("q")])
    await client.close()
    return 1.0


async def test_map_names_chat_and_responses_calls_for_recording_training_and_weights(kiln_server):
    engine = ScriptedEngine(["ok"])
    run = await kiln_server(engine, agent_names={"^Say APPROVE": "critic"}).run(three_calls)
    assert run.attempt.status.value == "succeeded", run.attempt.error
    assert run.agents() == ["critic", "critic", None]
    assert [r.agent for r in engine.requests] == ["critic", "critic", None]  # the engine picks weights by it
    selected = build_transitions(run.rollout, run.attempts, run.spans, agent_match="^critic$")
    assert [t.agent for t in selected.transitions] == ["critic", "critic"]


async def test_without_a_map_those_calls_are_unnamed(kiln_server):
    run = await kiln_server(ScriptedEngine(["ok"])).run(three_calls)
    assert run.agents() == [None, None, None]


def test_create_app_refuses_a_bad_rule():
    with pytest.raises(ValueError, match="bad regex"):
        create_app(InMemoryStore(sweep_interval_s=None), sweep_interval_s=0, agent_names={"[": "critic"})


# --------------------------------------------------------------------------- kiln serve, serve_async, Trainer


def test_kiln_serve_agent_name_option_reaches_the_server(monkeypatch):
    import agentkiln.cli.serve  # noqa: F401  (adds the command)
    from agentkiln.cli.app import app

    seen = {}
    monkeypatch.setattr("agentkiln.server.serve.serve", lambda store, **kw: seen.update(kw))
    args = ["serve", "--engine", "none", "--agent-name", "^Say APPROVE=critic", "--agent-name", "^You write=writer"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen["agent_names"].name_for([sys(WRITER)]) == "writer"
    assert seen["agent_names"].name_for([sys(CRITIC)]) == "critic"


@pytest.mark.parametrize("bad", ["(=critic", "^Say=has space", "no-equals"])
def test_kiln_serve_refuses_a_bad_agent_name_rule(monkeypatch, bad):
    import agentkiln.cli.serve  # noqa: F401
    from agentkiln.cli.app import app

    monkeypatch.setattr("agentkiln.server.serve.serve", lambda store, **kw: pytest.fail("server started"))
    result = CliRunner().invoke(app, ["serve", "--engine", "none", "--agent-name", bad])
    assert result.exit_code == 2
    assert "--agent-name" in result.output


def test_serve_async_gives_the_map_to_create_app(monkeypatch):
    from agentkiln.server import serve as serve_mod

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # serve_async sets them; restored at teardown
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    seen = {}

    def fake_create_app(store, **kw):
        seen.update(kw)
        raise RuntimeError("stop here")

    monkeypatch.setattr(serve_mod, "create_app", fake_create_app)
    with pytest.raises(RuntimeError, match="stop here"):
        asyncio.run(serve_mod.serve_async("memory://", agent_names={"^Say": "critic"}))
    assert seen["agent_names"].name_for([sys(CRITIC)]) == "critic"

    async def must_not_open(url):
        pytest.fail("a bad rule must fail before the store is opened")

    monkeypatch.setattr(serve_mod, "open_store_async", must_not_open)
    with pytest.raises(ValueError, match="bad regex"):
        asyncio.run(serve_mod.serve_async("memory://", agent_names={"(": "critic"}))


async def test_trainer_agent_names_reach_its_gateway(tmp_path):
    trainer = kiln.Trainer(
        kiln.GRPO(agents=["critic"]),
        engine=ScriptedEngine(["ok"]),
        run_dir=tmp_path / "run",
        agent_names={"^Say APPROVE": "critic"},
    )
    url = await asyncio.to_thread(trainer.start_server)
    try:
        async with HttpStore(url) as store:
            started = await store.start_rollout({"q": 1})
            rid, aid = started.rollout.rollout_id, started.attempt.attempt_id
            client = openai.AsyncOpenAI(base_url=f"{url}/rollout/{rid}/attempt/{aid}/v1", api_key="x", max_retries=0)
            await client.chat.completions.create(model="m", messages=[sys(CRITIC), user("draft")])
            await client.close()
            (span,) = await store.query_spans(rid, name=SpanNames.llm_call)
        assert span.attributes[SpanAttrs.agent_name] == "critic"
    finally:
        await asyncio.to_thread(trainer.stop_server)


def test_trainer_refuses_bad_rules_and_rules_for_a_remote_server():
    with pytest.raises(ValueError, match="bad regex"):
        kiln.Trainer(kiln.GRPO(), engine=None, agent_names={"(": "critic"})
    with pytest.raises(ValueError, match="kiln serve --agent-name"):
        kiln.Trainer(kiln.GRPO(), server_url="http://127.0.0.1:1", agent_names={"^Say": "critic"})
