"""SFT on the best runs: selection rules, the learner raises the reward it imitates, the online loop."""

from __future__ import annotations

import json

import pytest
import torch

from agentkiln.algorithms.sft import SFT, SFTConfig, select_best
from agentkiln.engine.model_files import load_tokenizer, tiny_model_dir
from agentkiln.models import Transition
from agentkiln.training.config import LoraSettings
from agentkiln.training.learner import Learner as SFTLearner


def _t(rid: str, group: str, ret: float, step: int = 0) -> Transition:
    return Transition(
        rollout_id=rid, attempt_id="a", step=step, prompt_ids=[1], response_ids=[2], logprobs=[0.0],
        reward=ret, return_=ret, group_id=group,
    )


def test_select_best_threshold_and_top_k() -> None:
    ts = [_t("r1", "g1", 1.0), _t("r1", "g1", 1.0, step=1), _t("r2", "g1", 0.0), _t("r3", "g1", 0.7),
          _t("r4", "g2", 0.9), _t("r5", "g2", 0.95)]
    assert [t.rollout_id for t in select_best(ts, min_reward=1.0)] == ["r1", "r1"]
    assert {t.rollout_id for t in select_best(ts, min_reward=0.5)} == {"r1", "r3", "r4", "r5"}
    top1 = select_best(ts, min_reward=None, top_k=1)
    assert [(t.rollout_id, t.step) for t in top1] == [("r1", 0), ("r1", 1), ("r5", 0)]
    assert select_best(ts, min_reward=2.0) == []


@pytest.fixture(scope="module")
def tiny_dir() -> str:
    return str(tiny_model_dir())


def _good_mass(learner: SFTLearner, prompt: list[int]) -> float:
    """Exact expected reward: probability that the first response token is "good" (even id)."""
    with torch.no_grad():
        logits = learner.model(input_ids=torch.tensor([prompt])).logits[0, -1].float()
    probs = logits.softmax(-1)
    return float(probs[0::2].sum())


def test_rejection_sampling_sft_raises_expected_reward(tiny_dir: str) -> None:
    """Sample from the tiny model, keep responses whose first token is good, imitate them:
    the probability of a good first token (the mean reward, computed exactly) goes up."""
    tok = load_tokenizer(tiny_dir)
    prompt = list(tok.apply_chat_template([{"role": "user", "content": "Say something."}], add_generation_prompt=True,
                                          tokenize=True)["input_ids"])
    # Full fine-tune: the tiny model's LoRA (no embedding/output layer) moves a 14-token set too slowly.
    learner = SFTLearner(tiny_dir, SFTConfig(lr=2e-2, epochs=6, batch_size=16, lora=None, bf16=False))
    before = _good_mass(learner, prompt)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        probs = learner.model(input_ids=torch.tensor([prompt])).logits[0, -1].float().softmax(-1)
    samples = torch.multinomial(probs, 32, replacement=True, generator=gen).tolist()
    transitions = [
        Transition(rollout_id=f"r{i}", attempt_id="a", step=0, prompt_ids=prompt, response_ids=[tid],
                   logprobs=[0.0], return_=1.0 if tid % 2 == 0 else 0.0, group_id="g")
        for i, tid in enumerate(samples)
    ]
    kept = select_best(transitions, min_reward=1.0)
    assert 0 < len(kept) < len(transitions)
    metrics = learner.update(kept)
    after = _good_mass(learner, prompt)
    assert metrics["optimizer_steps"] == 6 * ((len(kept) + 15) // 16)
    assert metrics["loss"] < metrics["first_loss"]
    assert after > before + 0.2, (before, after)


def parity_agent(task: dict, llm, rollout) -> float:
    """Test agent: one short reply; reward 1 when its first character has an even code point (~50%)."""
    client = llm.openai(max_retries=0, timeout=120)
    mode = getattr(rollout.mode, "value", rollout.mode)
    reply = client.chat.completions.create(
        model=llm.model, messages=[{"role": "user", "content": task["text"]}], max_tokens=3,
        temperature=0.0 if mode == "val" else 1.0,
    )
    text = reply.choices[0].message.content or ""
    return 1.0 if text and ord(text[0]) % 2 == 0 else 0.0


def test_online_sft_loop_through_the_trainer(tmp_path, tiny_dir: str) -> None:
    from agentkiln.trainer import Trainer

    algo = SFT(
        model_dir=tiny_dir, rounds=2, tasks_per_round=2, samples_per_task=4, min_reward=1.0,
        config=SFTConfig(lr=1e-3, epochs=1, lora=LoraSettings(r=4, alpha=8), bf16=False),
    )
    events: list[tuple[str, dict]] = []
    trainer = Trainer(algo, n_runners=4, engine="tiny", run_dir=tmp_path / "run",
                      on_event=lambda k, d: events.append((k, d)))
    tasks = [{"id": f"t{i}", "text": f"word {i}"} for i in range(4)]
    result = trainer.fit(parity_agent, tasks, tasks[:2])

    assert [h["round"] for h in result.history] == [1, 2]
    assert result.val_before is not None and result.val_after is not None
    assert result.val_after >= result.val_before  # the best adapter (or the base model) is what is served
    kept = [h["kept_rollouts"] for h in result.history]
    assert sum(kept) > 0  # the parity reward is ~50%: some runs were imitated
    trained = [h for h in result.history if h["kept_rollouts"]]
    assert all("loss" in h and "val_reward" in h for h in trained)
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2
    assert [k for k, _ in events].count("step") == 2
