"""A framework example on the real transformers engine (tiny random Llama + SmolLM2 tokenizer).

The scripted engine's "tokenizer" is one id per character; here the ids come from a real
tokenizer, so this checks that what training reads (token ids) is what the agent saw (text).
"""

from __future__ import annotations

import pytest

from agentkiln.adapter.transitions import build_transitions
from agentkiln.engine.factory import build_engine
from agentkiln.protocol import SpanAttrs
from examples import langgraph_react
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
