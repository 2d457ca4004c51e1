"""TRL backend on the real model (slow): SmolLM2 trained by TRL's SFTTrainer and GRPOTrainer on
recorded-style token ids, each adapter then served by the embedded engine.

SFT teaches an answer the base model cannot know (a made-up word): the engine serving the
adapter says it. GRPO rewards that word over another in one group: it becomes likelier than the
other under the adapter the engine then serves.
"""

from __future__ import annotations

import pytest

from agentkiln.backends.trl import TRLBackendConfig, train_with_trl
from agentkiln.engine.base import ChatRequest
from agentkiln.engine.embedded import TransformersEngine
from agentkiln.engine.model_files import load_tokenizer, smollm2_dir
from agentkiln.models import Transition
from tests.test_backend_trl import _gap, _scores

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the secret word?", "Tell me the secret word.", "Which word is the secret one?",
             "Say the secret word."]  # fmt: skip
WORD, OTHER = "kilnwood", "oak"


def _call(tok, i: int, question: str, answer: str, ret: float = 0.0, group: str = "g") -> Transition:
    prompt = list(tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                          tokenize=True)["input_ids"])  # fmt: skip
    response = tok.encode(answer, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    return Transition(rollout_id=f"r{i}", attempt_id=f"a{i}", step=0, prompt_ids=prompt, response_ids=response,
                      logprobs=[0.0] * len(response), group_id=group, **{"return": ret})  # fmt: skip


async def _served_answer(model_dir: str, adapter: str, question: str) -> tuple[str, str]:
    engine = TransformersEngine(model_dir, dtype="float32")
    try:
        await engine.load_weights(adapter, "trl-v1")
        res = await engine.chat(ChatRequest(messages=[{"role": "user", "content": question}], temperature=0.0,
                                            max_tokens=16))  # fmt: skip
    finally:
        await engine.close()
    return res.model_version, res.choices[0].text


async def test_trl_sft_on_smollm2_is_served_by_the_engine(tmp_path):
    model_dir = str(smollm2_dir())
    tok = load_tokenizer(model_dir)
    calls = [_call(tok, i, q, f"The secret word is {WORD}.") for i, q in enumerate(QUESTIONS)]
    result = train_with_trl(calls, model_dir, tmp_path, TRLBackendConfig(lr=3e-3, epochs=8, batch_size=4))
    assert result.trained_on == 4
    version, text = await _served_answer(model_dir, result.adapter, QUESTIONS[0])
    assert version == "trl-v1" and WORD in text, text


async def test_trl_grpo_on_smollm2_prefers_the_rewarded_answer(tmp_path):
    model_dir = str(smollm2_dir())
    tok = load_tokenizer(model_dir)
    calls = [_call(tok, i, QUESTIONS[0], f"The secret word is {w}.", ret=float(w == WORD))
             for i, w in enumerate([WORD, OTHER, WORD, OTHER])]  # fmt: skip
    result = train_with_trl(calls, model_dir, tmp_path,
                            TRLBackendConfig(algorithm="grpo", lr=3e-3, epochs=6, batch_size=4))  # fmt: skip
    assert result.trained_on == 4 and result.dropped == {}
    good = [c.return_ == 1.0 for c in calls]
    before = _gap(_scores(model_dir, None, calls), good)
    after = _gap(_scores(model_dir, result.adapter, calls), good)
    assert after > before + 1.0, (before, after)
    version, _ = await _served_answer(model_dir, result.adapter, QUESTIONS[0])
    assert version == "trl-v1"
