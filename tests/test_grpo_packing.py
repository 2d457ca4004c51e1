"""Tree-packed micro-batches and the sliced output layer give the same numbers as the padded path."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from agentkiln.algorithms.grpo import GRPOConfig
from agentkiln.engine.model_files import load_model, tiny_model_dir
from agentkiln.models import Transition
from agentkiln.training import head as head_module
from agentkiln.training import learner as learner_mod
from agentkiln.training import packing as grpo_module
from agentkiln.training import packing as packing_module
from agentkiln.training.head import chosen_logprobs
from agentkiln.training.learner import Learner as GRPOLearner
from agentkiln.training.packing import ATTN_NAME, LAYOUT_KWARG, build_tree, enable_tree_attention, tree_attention
from agentkiln.training.packing import collate as _collate


@pytest.fixture(scope="module")
def tiny() -> Path:
    return tiny_model_dir()


def mixed_batch(seed: int = 0) -> list[Transition]:
    """A GRPO group sharing a prompt (responses partly sharing first tokens, one of length 1),
    rows of other prompts, and a merged multi-turn transition (mask zeros inside the response)."""
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(1, 1000) for _ in range(n)]

    prompt = ids(7)
    shared_start = ids(3)
    responses = [ids(5), shared_start + ids(4), shared_start + ids(2), [17], ids(9)]
    rows = [(prompt, r) for r in responses] + [(ids(4), ids(6)), (ids(11), ids(3))]
    out = []
    for i, (p, r) in enumerate(rows):
        out.append(
            Transition(
                rollout_id=f"r{i}",
                attempt_id="a",
                step=0,
                prompt_ids=p,
                response_ids=r,
                logprobs=[rng.uniform(-8.0, -0.5) for _ in r],
                response_mask=[1] * len(r),
                advantage=rng.choice([1.0, -1.0, 0.5]),
            )
        )
    merged = out[-1]  # assistant turn, tool output (masked), assistant turn
    merged.response_ids = ids(3) + ids(4) + ids(2)
    merged.response_mask = [1, 1, 1, 0, 0, 0, 0, 1, 1]
    merged.logprobs = [rng.uniform(-8.0, -0.5) for _ in merged.response_ids]
    return out


def make_learner(tiny: Path, **kw) -> GRPOLearner:
    """Same LoRA init and a non-zero adapter (so every LoRA weight gets a gradient)."""
    torch.manual_seed(0)
    learner = GRPOLearner(tiny, GRPOConfig(**{"lr": 0.0, "bf16": False, "max_grad_norm": 1e9, **kw}))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in learner.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return learner


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """Equal up to fp32 rounding, relative to the tensor's scale (not element by element)."""
    return bool((a - b).abs().max() <= rel * b.abs().max() + 1e-9)


def grads(learner: GRPOLearner) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None}


def test_build_tree_shares_prefixes_and_points_at_the_right_positions() -> None:
    prompt = [5, 6, 7]
    seqs = [prompt + [1, 2, 3], prompt + [1, 4], prompt + [9], [8, 8, 1, 2]]
    prompt_lens = [3, 3, 3, 2]
    for share in (True, False):
        lay = build_tree(seqs, prompt_lens, share)
        inputs = [s[:-1] for s in seqs]
        distinct = {tuple(x[: i + 1]) for x in inputs for i in range(len(x))}
        assert lay.nodes == (len(distinct) if share else sum(len(x) for x in inputs))
        ids, pos = lay.input_ids[0].tolist(), lay.position_ids[0].tolist()
        k = 0
        for s, p in zip(seqs, prompt_lens):
            for j in range(len(s) - p):  # response token p + j is predicted by input position p + j - 1
                node = lay.predictors[k]
                assert ids[node] == s[p + j - 1] and pos[node] == p + j - 1
                k += 1
        assert k == len(lay.predictors)
        # Every node is the output of exactly one chain slot, and sees itself.
        assert sorted(lay.out_index.tolist()) == sorted(set(lay.out_index.tolist()))
        q = lay.q_index.shape[1]
        for node, slot in enumerate(lay.out_index.tolist()):
            c, i = divmod(slot, q)
            assert lay.q_index[c, i] == node
            visible = lay.k_index[c][lay.mask[c, 0, i]].tolist()
            assert node in visible and len(visible) == pos[node] + 1  # the root path, itself included


@pytest.mark.parametrize("share", [True, False])
def test_packed_update_matches_padded(tiny: Path, share: bool) -> None:
    """Log-probs, reference log-probs, loss metrics and LoRA gradients equal the padded layouts (fp32)."""
    ts = mixed_batch()
    cfg = {"share_prompt": share, "micro_batch_size": 8, "kl_coef": 0.1, "temperature": 0.7}
    cfg["skip_zero_advantage"] = False
    results = []
    for pack in (True, False):
        learner = make_learner(tiny, pack=pack, **cfg)
        assert learner._tree == pack
        lps = learner.logprobs(ts)
        ref = learner.logprobs(ts, reference=True)
        metrics = learner.update(ts)
        results.append((lps, ref, metrics, grads(learner)))
    (lp_a, ref_a, m_a, g_a), (lp_b, ref_b, m_b, g_b) = results
    for x, y in zip(lp_a + ref_a, lp_b + ref_b):
        assert x == pytest.approx(y, abs=2e-5)
    for key in ("loss", "pg_loss", "kl", "ratio_mean", "approx_kl_old", "grad_norm"):
        assert m_a[key] == pytest.approx(m_b[key], rel=1e-4, abs=1e-7), key
    assert g_a.keys() == g_b.keys() and any("lora_A" in k for k in g_a)
    for k in g_a:
        assert close(g_a[k], g_b[k]), k


def test_large_chains_go_through_sdpa_with_the_same_result(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ts = mixed_batch(seed=4)
    want = make_learner(tiny, pack=False).logprobs(ts)
    monkeypatch.setattr(packing_module, "MATH_MAX_SCORES", 0)  # every layout above the explicit-matmul limit
    got = make_learner(tiny).logprobs(ts)
    for x, y in zip(got, want):
        assert x == pytest.approx(y, abs=2e-5)


def test_packed_full_finetune_matches_padded(tiny: Path) -> None:
    """Full fine-tune: the tied embedding / output layer gets the same gradient through the sliced head."""
    ts = mixed_batch(seed=1)
    results = []
    for pack in (True, False):
        learner = make_learner(tiny, pack=pack, lora=None, kl_coef=0.05, micro_batch_size=4)
        learner.update(ts)
        results.append(grads(learner))
    g_a, g_b = results
    assert g_a.keys() == g_b.keys() and any("embed" in k for k in g_a)
    for k in g_a:
        assert close(g_a[k], g_b[k]), k


def test_packed_path_is_used(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Packing is on by default and the decoder really runs the tree attention with a layout."""
    seen: list[int] = []
    real = tree_attention

    def spy(*args, **kwargs):
        seen.append(int(kwargs.get(LAYOUT_KWARG) is not None))
        return real(*args, **kwargs)

    built: list[int] = []
    real_build = grpo_module.build_tree
    monkeypatch.setattr(grpo_module, "build_tree", lambda *a, **k: built.append(1) or real_build(*a, **k))
    learner = GRPOLearner(tiny, GRPOConfig(bf16=False))
    assert learner._tree and learner.model.config._attn_implementation == ATTN_NAME
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, ATTN_NAME, spy)  # after the learner registered it
    learner.update(mixed_batch())
    assert built and seen and all(seen)  # every attention call got a layout


def test_falls_back_to_padding_when_attention_cannot_be_switched(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ts = mixed_batch(seed=2)
    want = make_learner(tiny, pack=False).logprobs(ts)
    monkeypatch.setattr(grpo_module, "enable_tree_attention", lambda model: False)
    learner = make_learner(tiny)
    assert not learner._tree
    assert learner._collate([learner._item(t) for t in ts]).layout is None
    assert all(x == pytest.approx(y, abs=2e-5) for x, y in zip(learner.logprobs(ts), want))
    # A batch packed by a caller (SFT calls _collate directly) is re-collated with padding.
    items = [learner._item(t) for t in ts]
    packed = _collate(items, learner.pad_id, True)
    assert packed.layout is not None
    lp = learner._token_logprobs(learner.model, packed).tolist()
    assert lp == pytest.approx([x for row in want for x in row], abs=2e-5)
    # A model on eager attention is not switched.
    eager = load_model(tiny)
    eager.set_attn_implementation("eager")
    assert not enable_tree_attention(eager)


def test_bf16_weights_and_packing_keep_the_numbers(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 LoRA learner: frozen decoder Linears are stored in bf16, giving exactly what autocast
    gives with fp32 weights; packed and padded agree to bf16 precision."""
    monkeypatch.setattr(learner_mod, "bf16_is_fast", lambda device_type: True)  # the bf16 path, on any CPU
    ts = mixed_batch(seed=3)
    learner = make_learner(tiny, bf16=True)
    base_linears = [m for n, m in learner.model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n]
    decoder_linears = [m for m in base_linears if m.weight.dtype == torch.bfloat16]
    assert decoder_linears and all(not m.weight.requires_grad for m in decoder_linears)
    assert all(p.dtype == torch.float32 for p in learner.trainable)
    packed = learner.logprobs(ts)
    for m in decoder_linears:
        m.float()  # what autocast saw before: fp32 weights cast to bf16 on every call
    assert learner.logprobs(ts) == packed
    padded = make_learner(tiny, bf16=True, pack=False).logprobs(ts)
    for x, y in zip(packed, padded):
        assert x == pytest.approx(y, abs=0.05)


@pytest.mark.parametrize("max_kept", [1000, 2])  # keeps the slices / recomputes them in the backward
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sliced_head_matches_log_softmax(max_kept: int, temperature: float, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(6, 16, requires_grad=True)
    weight = (torch.randn(5000, 16) * 0.3).requires_grad_(True)  # several vocabulary slices
    targets = torch.randint(0, 5000, (6,))
    coef = torch.randn(6)
    got = chosen_logprobs(hidden, weight, targets, temperature, max_kept=max_kept)
    (got * coef).sum().backward()
    g_h, g_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    want = torch.log_softmax(hidden @ weight.t() / temperature, -1).gather(1, targets[:, None]).squeeze(1)
    (want * coef).sum().backward()
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(g_h, hidden.grad, atol=1e-6) and torch.allclose(g_w, weight.grad, atol=1e-6)
    # fp64 gradcheck on a small vocabulary cut into uneven slices. A second backward (gradcheck
    # runs several) recomputes the slices instead of reusing them: equal up to rounding.
    monkeypatch.setattr(head_module, "VOCAB_SLICE", 7)
    h64 = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    w64 = torch.randn(30, 5, dtype=torch.float64, requires_grad=True)
    t64 = torch.tensor([0, 7, 29, 13])
    assert torch.autograd.gradcheck(
        lambda h, w: chosen_logprobs(h, w, t64, temperature, max_kept=max_kept), (h64, w64), nondet_tol=1e-12
    )
