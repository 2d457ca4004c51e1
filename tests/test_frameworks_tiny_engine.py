"""A framework example on the real transformers engine (tiny random Llama + SmolLM2 tokenizer).

The scripted engine's "tokenizer" is one id per character; here the ids come from a real
tokenizer, so this checks that what training reads (token ids) is what the agent saw (text).
"""

from __future__ import annotations

import pytest

from agentkiln.adapter.transitions import build_transitions
from agentkiln.engine.factory import build_engine
from agentkiln.protocol import SpanAttrs
from examples import autogen_team, langgraph_react
from tests.test_frameworks_common import serving

pytestmark = pytest.mark.slow


@pytest.fixture
def kiln_server():
    yield from serving()


async def test_langgraph_write_check_on_tiny_engine(kiln_server):
    engine = build_engine("tiny")
    server = kiln_server(engine)
    run = await server.run(langgraph_react.write_check, sampling={"max_tokens": 8, "temperature": 0.0})
    assert run.attempt.status.value == "succeeded", run.attempt.error
    assert run.agents() == ["writer", "checker"] * (len(run.calls) // 2) and len(run.calls) >= 2
    assert len(run.rewards) == 1

    tok = engine.tokenizer
    texts = []
    for span in run.calls:
        attrs = span.attributes
        text = attrs[SpanAttrs.response]["choices"][0]["message"]["content"] or ""
        assert tok.decode(attrs[SpanAttrs.response_token_ids], skip_special_tokens=True).strip() == text.strip()
        prompt = tok.decode(attrs[SpanAttrs.prompt_token_ids])
        assert "What is 17 * 23?" in prompt
        texts.append(text)
    writer_prompts = [tok.decode(s.attributes[SpanAttrs.prompt_token_ids]) for s in run.calls[::2]]
    for draft, later_prompt in zip(texts[::2], writer_prompts[1:]):
        assert draft.strip() in later_prompt  # each rewrite's prompt holds the earlier draft

    result = build_transitions(run.rollout, run.attempts, run.spans, agent_match="^writer$")
    assert len(result.transitions) == len(run.calls) // 2
    assert all(t.prompt_ids and t.response_ids for t in result.transitions)


async def test_autogen_shared_client_team_on_tiny_engine_is_named_by_the_map(kiln_server):
    """Two AssistantAgents on ONE OpenAIChatCompletionClient: the calls differ only in the system
    prompt, which the server's agent-name map turns into the recorded (and trained) agent name."""
    server = kiln_server(build_engine("tiny"), agent_names=autogen_team.AGENT_NAMES)
    run = await server.run(autogen_team.shared_team, sampling={"max_tokens": 8, "temperature": 0.0})
    assert run.attempt.status.value == "succeeded", run.attempt.error
    # The random model never calls the tool nor says APPROVED: 5 turns after the task, solver first.
    assert run.agents() == ["solver", "reviewer", "solver", "reviewer", "solver"]
    for span, agent in zip(run.calls, run.agents()):
        system = span.attributes[SpanAttrs.request]["messages"][0]
        assert system["role"] == "system" and "name" not in system  # AutoGen sends no name of its own
        assert system["content"].startswith({"solver": "You solve", "reviewer": "You review"}[agent])
    result = build_transitions(run.rollout, run.attempts, run.spans, agent_match="^reviewer$")
    assert len(result.transitions) == 2 and {t.agent for t in result.transitions} == {"reviewer"}
