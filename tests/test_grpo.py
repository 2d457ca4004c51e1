"""GRPO learner on the tiny random model (fast) and on SmolLM2 (slow)."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch

from agentkiln.algorithms.grpo import GRPOConfig, LoraSettings
from agentkiln.engine.model_files import load_model, smollm2_dir, tiny_model_dir
from agentkiln.models import Transition
from agentkiln.training.learner import Learner as GRPOLearner

log = logging.getLogger(__name__)


def make_transitions(n: int = 6, seed: int = 0, vocab: int = 1000) -> list[Transition]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(3, 9))]
        resp = [rng.randrange(1, vocab) for _ in range(rng.randint(2, 7))]
        out.append(
            Transition(
                rollout_id=f"r{i}",
                attempt_id="a",
                step=0,
                prompt_ids=prompt,
                response_ids=resp,
                logprobs=[-7.0] * len(resp),
                response_mask=[1] * len(resp),
                advantage=1.0 if i % 2 == 0 else -1.0,
            )
        )
    return out


def lora_state(learner: GRPOLearner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.model.named_parameters() if "lora_" in n}


def base_state(learner: GRPOLearner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.model.named_parameters() if "lora_" not in n}


@pytest.fixture(scope="module")
def tiny() -> Path:
    return tiny_model_dir()


def test_update_changes_lora_only(tiny: Path) -> None:
    torch.manual_seed(0)
    learner = GRPOLearner(tiny, GRPOConfig(lr=1e-2, micro_batch_size=4, epochs=2))
    lora0, base0 = lora_state(learner), base_state(learner)
    m = learner.update(make_transitions())
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values())
    assert m["optimizer_steps"] == 2 and learner.step == 2
    assert m["tokens_per_s"] > 0 and m["trained_tokens"] > 0
    lora1, base1 = lora_state(learner), base_state(learner)
    assert any(not torch.equal(lora0[k], lora1[k]) for k in lora0)
    assert all(torch.equal(base0[k], base1[k]) for k in base0)


def test_logprobs_match_full_forward(tiny: Path) -> None:
    learner = GRPOLearner(tiny, GRPOConfig(bf16=False, micro_batch_size=3))
    ts = make_transitions(5)
    got = learner.logprobs(ts)
    model = load_model(tiny)
    for t, lp in zip(ts, got):
        ids = torch.tensor([t.prompt_ids + t.response_ids])
        with torch.no_grad():
            full = torch.log_softmax(model(ids).logits[0].float(), -1)
        p = len(t.prompt_ids)
        want = [full[p - 1 + j, tok].item() for j, tok in enumerate(t.response_ids)]
        assert lp == pytest.approx(want, abs=1e-4)
    # The reference (adapter disabled) equals the base model before any update.
    assert learner.logprobs(ts, reference=True)[0] == pytest.approx(got[0], abs=1e-5)


def test_logprobs_use_the_sampling_temperature(tiny: Path) -> None:
    """Recorded logprobs come from log_softmax(logits / T); the learner must score the same way."""
    learner = GRPOLearner(tiny, GRPOConfig(bf16=False, temperature=0.7))
    ts = make_transitions(2)
    got = learner.logprobs(ts)
    model = load_model(tiny)
    for t, lp in zip(ts, got):
        ids = torch.tensor([t.prompt_ids + t.response_ids])
        with torch.no_grad():
            full = torch.log_softmax(model(ids).logits[0].float() / 0.7, -1)
        p = len(t.prompt_ids)
        assert lp == pytest.approx([full[p - 1 + j, tok].item() for j, tok in enumerate(t.response_ids)], abs=1e-4)


def test_chunked_output_layer_matches(tiny: Path) -> None:
    ts = make_transitions(4)
    a = GRPOLearner(tiny, GRPOConfig(bf16=False)).logprobs(ts)
    b = GRPOLearner(tiny, GRPOConfig(bf16=False, logits_chunk=3)).logprobs(ts)
    for x, y in zip(a, b):
        assert x == pytest.approx(y, abs=1e-5)


def test_micro_batching_gives_the_same_gradient(tiny: Path) -> None:
    ts = make_transitions(6)
    grads = []
    for mbs in (1, 6):
        torch.manual_seed(0)  # same LoRA init in both learners
        learner = GRPOLearner(tiny, GRPOConfig(lr=0.0, bf16=False, micro_batch_size=mbs, max_grad_norm=1e9))
        learner.update(ts)
        grads.append({n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6), k


def test_shared_prompt_path_matches_separate_rows(tiny: Path) -> None:
    """A GRPO group's prompt run once with a repeated KV cache gives the same log-probs and gradient."""
    ts = make_transitions(7, seed=3)
    for t in ts[:5]:
        t.prompt_ids = list(ts[0].prompt_ids)
    ts[1].response_ids, ts[1].logprobs, ts[1].response_mask = [5], [-7.0], [1]  # length-1 response
    results = []
    for share in (True, False):
        torch.manual_seed(0)
        learner = GRPOLearner(tiny, GRPOConfig(lr=0.0, bf16=False, micro_batch_size=4, share_prompt=share))
        assert any(len(idx) > 1 for idx in learner._micro_batches([learner._item(t) for t in ts]))
        lps = learner.logprobs(ts)
        learner.update(ts)
        grads = {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None}
        results.append((lps, grads))
    (lp_a, g_a), (lp_b, g_b) = results
    for x, y in zip(lp_a, lp_b):
        assert x == pytest.approx(y, abs=1e-5)
    for k in g_a:
        assert torch.allclose(g_a[k], g_b[k], atol=1e-6), k
    # A group of response-length-1 rows only (no response forward at all).
    one = [t.model_copy(update={"response_ids": [7], "logprobs": [-1.0], "response_mask": [1]}) for t in ts[:3]]
    torch.manual_seed(0)
    learner = GRPOLearner(tiny, GRPOConfig(bf16=False, share_prompt=True))
    torch.manual_seed(0)
    plain = GRPOLearner(tiny, GRPOConfig(bf16=False, share_prompt=False))
    assert learner.logprobs(one)[0] == pytest.approx(plain.logprobs(one)[0], abs=1e-5)


def test_masked_and_zero_advantage_tokens_do_not_train(tiny: Path) -> None:
    learner = GRPOLearner(tiny, GRPOConfig(lr=1e-2))
    lora0 = lora_state(learner)
    ts = make_transitions(3)
    for t in ts:
        t.advantage = 0.0
    m = learner.update(ts)
    assert m["optimizer_steps"] == 0
    masked = make_transitions(2)
    for t in masked:
        t.response_mask = [0] * len(t.response_ids)
    assert learner.update(masked)["optimizer_steps"] == 0
    assert all(torch.equal(lora0[k], v) for k, v in lora_state(learner).items())
    with pytest.raises(ValueError):
        bad = make_transitions(1)[0]
        bad.logprobs = bad.logprobs[:-1]
        learner.update([bad])


def test_save_writes_a_peft_adapter(tiny: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    learner = GRPOLearner(tiny, GRPOConfig(lr=1e-2, bf16=False, lora=LoraSettings(r=4, alpha=8)))
    ts = make_transitions()
    learner.update(ts)
    out = learner.save(tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    served = PeftModel.from_pretrained(load_model(tiny), str(out)).eval()
    t = ts[0]
    ids = torch.tensor([t.prompt_ids + t.response_ids])
    with torch.no_grad():
        full = torch.log_softmax(served(ids).logits[0].float(), -1)
    p = len(t.prompt_ids)
    want = [full[p - 1 + j, tok].item() for j, tok in enumerate(t.response_ids)]
    assert learner.logprobs([t])[0] == pytest.approx(want, abs=1e-4)


def test_checkpoint_resume_restores_step_and_optimizer(tiny: Path, tmp_path: Path) -> None:
    cfg = GRPOConfig(lr=1e-2, bf16=False)
    ts = make_transitions()
    torch.manual_seed(0)
    a = GRPOLearner(tiny, cfg)
    a.update(ts)
    a.update(ts)
    a.checkpoint(tmp_path / "ckpt")
    a.checkpoint(tmp_path / "ckpt")  # overwriting an existing checkpoint works
    b = GRPOLearner(tiny, cfg)
    b.load_checkpoint(tmp_path / "ckpt")
    assert b.step == a.step == 2
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"])
    # Resumed training continues exactly where the original would have gone.
    a.update(ts)
    b.update(ts)
    la, lb = lora_state(a), lora_state(b)
    assert all(torch.allclose(la[k], lb[k], atol=1e-7) for k in la)


def test_full_finetune_with_kl_reference(tiny: Path, tmp_path: Path) -> None:
    learner = GRPOLearner(tiny, GRPOConfig(lr=1e-3, lora=None, kl_coef=0.1, epochs=2, bf16=False))
    assert learner.ref_model is not None
    m = learner.update(make_transitions(4))
    assert m["kl"] >= 0 and m["optimizer_steps"] == 2
    out = learner.save(tmp_path / "full")
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    reloaded = load_model(out)
    t = make_transitions(1)[0]
    ids = torch.tensor([t.prompt_ids + t.response_ids])
    with torch.no_grad():
        full = torch.log_softmax(reloaded(ids).logits[0].float(), -1)
    p = len(t.prompt_ids)
    want = [full[p - 1 + j, tok].item() for j, tok in enumerate(t.response_ids)]
    assert learner.logprobs([t])[0] == pytest.approx(want, abs=1e-4)
    learner.checkpoint(tmp_path / "ck")
    other = GRPOLearner(tiny, GRPOConfig(lr=1e-3, lora=None, kl_coef=0.1, bf16=False))
    other.load_checkpoint(tmp_path / "ck")
    assert other.step == 2
    assert other.logprobs([t])[0] == pytest.approx(want, abs=1e-5)


@pytest.mark.slow
def test_real_model_grpo_moves_logprobs_toward_rewarded_samples() -> None:
    """Sample K responses, reward those containing a chosen token, check the policy follows."""
    from agentkiln.engine.model_files import load_tokenizer

    torch.manual_seed(1)
    model_dir = smollm2_dir()
    tok = load_tokenizer(model_dir)
    learner = GRPOLearner(model_dir, GRPOConfig(lr=3e-4, micro_batch_size=8))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}], add_generation_prompt=True, tokenize=True
    )
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
    k = 8
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = learner.model.generate(
            input_ids=torch.tensor([prompt] * k),
            do_sample=True,
            temperature=1.0,
            max_new_tokens=10,
            pad_token_id=tok.pad_token_id,
        )
    responses = [row[len(prompt) :].tolist() for row in out]
    responses = [r[: r.index(tok.eos_token_id) + 1] if tok.eos_token_id in r else r for r in responses]
    # Reward responses containing the token that splits the samples most evenly.
    counts: dict[int, int] = {}
    for r in responses:
        for x in set(r):
            counts[x] = counts.get(x, 0) + 1
    chosen = min(counts, key=lambda x: abs(counts[x] - k / 2))
    rewards = [1.0 if chosen in r else 0.0 for r in responses]
    assert 0 < sum(rewards) < k, (responses, chosen)
    mean = sum(rewards) / k
    std = (sum((r - mean) ** 2 for r in rewards) / k) ** 0.5
    base = [
        Transition(
            rollout_id=f"r{i}", attempt_id="a", step=0, prompt_ids=prompt, response_ids=r, logprobs=[0.0] * len(r)
        )
        for i, r in enumerate(responses)
    ]
    old = learner.logprobs(base)
    ts = [
        t.model_copy(update={"logprobs": lp, "advantage": (rw - mean) / (std + 1e-6)})
        for t, lp, rw in zip(base, old, rewards)
    ]

    def mean_lp(lps: list[list[float]], want: float) -> float:
        vals = [sum(lp) / len(lp) for lp, rw in zip(lps, rewards) if rw == want]
        return sum(vals) / len(vals)

    before_pos, before_neg = mean_lp(old, 1.0), mean_lp(old, 0.0)
    for _ in range(3):
        m = learner.update(ts)
        log.info("update: %s", m)
    after = learner.logprobs(ts)
    after_pos, after_neg = mean_lp(after, 1.0), mean_lp(after, 0.0)
    log.info("rewarded %.3f -> %.3f, unrewarded %.3f -> %.3f", before_pos, after_pos, before_neg, after_neg)
    assert after_pos > before_pos + 0.05
    assert after_neg < before_neg - 0.05
