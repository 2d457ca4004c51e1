"""Chat templates are chosen per model: SmolLM2's format for SmolLM2, the model's own template otherwise."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from agentkiln.engine.base import ChatRequest
from agentkiln.engine.chat import template_for
from agentkiln.engine.chat.hf_template import HFChatTemplate
from agentkiln.engine.chat.smollm2 import SmolLM2Template, render_prompt
from agentkiln.engine.model_files import load_tokenizer, tiny_model_dir
from tests.test_chat_format import WEATHER

# A Hermes/Qwen-style template (tools in the system turn, calls as <tool_call> JSON), no SmolLM in it.
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{{ messages[0]['content'] if messages[0]['role'] == 'system' else 'You are Qwen.' }}"
    "\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools><|im_end|>\n"
    "{% elif messages[0]['role'] != 'system' %}<|im_start|>system\nYou are Qwen.<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' and (tools or not loop.first) %}{% continue %}{% endif %}"
    "{% if m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% for c in m.get('tool_calls', []) %}{{ '\\n' }}<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}'
    "<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    """The tiny model's weights and vocabulary under another name, with a Hermes-style template."""
    path = tmp_path_factory.mktemp("models") / "other-model"
    shutil.copytree(tiny_model_dir(), path)
    (path / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    return path


def test_smollm2_and_tiny_model_get_smollm2_format():
    tok = load_tokenizer(tiny_model_dir())
    template = template_for(tok, tiny_model_dir())
    assert isinstance(template, SmolLM2Template)
    msgs = [{"role": "user", "content": "hi"}]
    assert template.render(msgs, [WEATHER]) == render_prompt(tok, msgs, [WEATHER])


def test_other_models_get_their_own_template(other_model_dir):
    tok = load_tokenizer(other_model_dir)
    template = template_for(tok, other_model_dir)
    assert isinstance(template, HFChatTemplate)
    msgs = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    rendered = template.render(msgs, [WEATHER])
    assert rendered.text.startswith("<|im_start|>system\nBe brief.\n<tools>\n")
    assert '"name": "get_weather"' in rendered.text and "SmolLM" not in rendered.text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in rendered.text
    assert "<tool_response>\nsunny\n</tool_response>" in rendered.text
    assert rendered.text.endswith("<|im_start|>assistant\n")
    assert rendered.ids == tok(rendered.text, add_special_tokens=False)["input_ids"]
    parsed = template.parse(
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>', [WEATHER]
    )
    assert parsed.parse_error is None and json.loads(parsed.tool_calls[0].arguments) == {"city": "Rome"}


def test_engine_renders_with_the_models_template(other_model_dir):
    from agentkiln.engine.embedded import TransformersEngine

    engine = TransformersEngine(other_model_dir, model_name="other", dtype="float32", prefix_cache_tokens=0)

    async def run():
        try:
            return await engine.chat(ChatRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=3))
        finally:
            await engine.close()

    assert isinstance(engine.chat_template, HFChatTemplate)
    result = asyncio.run(run())
    assert (
        result.prompt_text
        == "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
