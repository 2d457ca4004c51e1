"""Production sessions + feedback -> SFT examples, DPO pairs, off-policy GRPO transitions, and the report."""

from __future__ import annotations

import pytest

from agentkiln.engine.model_files import load_tokenizer, tiny_model_dir
from agentkiln.models import Feedback
from agentkiln.production.dataset import (
    DatasetConfig,
    build_dataset,
    feedback_reward,
    load_production_dataset,
    read_sessions,
    reply_ids,
)
from agentkiln.production.since import parse_since
from agentkiln.store.memory import InMemoryStore
from tests.production_data import NAME, WINDOW_START, answer_ids, chat_prompt, fill_production


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(tiny_model_dir())


@pytest.fixture
async def store(tok):
    s = InMemoryStore(sweep_interval_s=None)
    await fill_production(s, tok)
    yield s
    await s.close()


def _decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


async def test_sets_and_report(store, tok) -> None:
    data = await load_production_dataset(store, WINDOW_START, DatasetConfig(names=(NAME,)), tok)
    r = data.report
    assert r.sessions == 5  # alice, bob, carol, dave, erin have calls in the window
    # calls: 8 in the window; rated with token ids: a1, b1, c1, c2, e2
    assert r.calls.used == 5 and r.calls.dropped == {"no_feedback": 2, "redacted": 1}
    assert r.feedback.used == 6
    assert r.feedback.dropped == {"call_not_in_window": 1, "name_not_selected": 1, "superseded": 1,
                                  "unknown_label": 1}
    assert r.model_versions == {"v1": 4, "v2": 1}

    # SFT: the calls rated 1 (a1 own thumb, c1 by the session rating, e2 by a label)
    assert sorted(_decode(tok, t.response_ids) for t in data.sft) == ["4", "Blue", "Yes"]
    assert r.sft.used == 3 and r.sft.dropped == {"below_threshold": 2}
    a1 = next(t for t in data.sft if _decode(tok, t.response_ids) == "4")
    assert a1.prompt_ids == chat_prompt(tok, "What is 2 + 2?") and a1.response_ids == answer_ids(tok, "4")

    # DPO: the correction on b1, and a1 over b1 (same prompt, rated 1 vs 0)
    assert r.dpo.used == 2 and r.dpo.from_corrections == 1 and r.dpo.from_ratings == 1
    fix = next(p for p in data.dpo if p.source == "correction")
    assert fix.chosen.prompt_ids == fix.rejected.prompt_ids == chat_prompt(tok, "What is 2 + 2?")
    assert fix.chosen.response_ids == reply_ids(tok, "4") == answer_ids(tok, "4")  # ends with <|im_end|>
    assert _decode(tok, fix.rejected.response_ids) == "5"
    rated = next(p for p in data.dpo if p.source == "ratings")
    assert (_decode(tok, rated.chosen.response_ids), _decode(tok, rated.rejected.response_ids)) == ("4", "5")

    # GRPO: a1/b1 share the prompt (a group of 2: +1/-1); c1/c2 share the baseline (1 vs 0); e2 has no logprobs
    adv = {_decode(tok, t.response_ids): t.advantage for t in data.grpo}
    assert adv == pytest.approx({"4": 1.0, "5": -1.0, "Blue": 1.0, "Stone": -1.0}, abs=1e-4)
    assert r.grpo.groups == 1 and r.grpo.baseline == 2 and r.grpo.dropped == {"no_logprobs": 1}
    assert all(t.logprobs == [-1.5] * len(t.response_ids) for t in data.grpo)  # the recorded old policy
    assert {t.model_version for t in data.grpo} == {"v1", "v2"}


async def test_session_rating_is_each_calls_reward_unless_rated_itself(store, tok) -> None:
    data = await load_production_dataset(store, WINDOW_START, DatasetConfig(names=(NAME,)), tok)
    carol = {_decode(tok, t.response_ids): t.reward for t in data.grpo if t.rollout_id.startswith("session-")
             and _decode(tok, t.response_ids) in ("Blue", "Stone")}
    assert carol == {"Blue": 1.0, "Stone": 0.0}


async def test_without_the_name_filter_the_latest_feedback_wins(store, tok) -> None:
    data = await load_production_dataset(store, WINDOW_START, DatasetConfig(), tok)
    # a1's later "satisfaction": false replaces its thumbs up: no more SFT example, no rated pair
    assert "4" not in [_decode(tok, t.response_ids) for t in data.sft]
    assert data.report.feedback.dropped.get("superseded") == 2
    assert [p.source for p in data.dpo] == ["correction"]
    assert data.report.dpo.dropped == {"tie": 1}  # a1 and b1 are now both rated 0


async def test_label_map_threshold_and_tokenizer_are_configurable(store, tok) -> None:
    sessions = await read_sessions(store, WINDOW_START)
    labels = {"thumbs_down": 0.0, "thumbs_up": 1.0, "meh": 0.5}
    data = build_dataset(sessions, WINDOW_START, DatasetConfig(names=(NAME,), labels=labels, min_reward=0.5))
    assert "unknown_label" not in data.report.feedback.dropped
    assert data.report.calls.dropped == {"no_feedback": 1, "redacted": 1}
    assert "None" in [_decode(tok, t.response_ids) for t in data.sft]  # "meh" = 0.5 passes 0.5
    # no tokenizer given: a correction cannot be tokenized, and the report says so
    assert data.report.dpo.dropped == {"no_tokenizer": 1} and data.report.dpo.from_corrections == 0
    # a window after everything: nothing read
    assert await read_sessions(store, parse_since("0s")) == []


def test_feedback_values() -> None:
    labels = DatasetConfig().labels
    assert feedback_reward(True, labels) == 1.0 and feedback_reward(False, labels) == 0.0
    assert feedback_reward(4.5, labels) == 4.5
    assert feedback_reward("Good", labels) == 1.0 and feedback_reward(" down ", labels) == 0.0
    assert feedback_reward("meh", labels) is None
    with pytest.raises(ValueError):
        DatasetConfig(labels={"good": "yes"})  # type: ignore[dict-item]


def test_parse_since() -> None:
    assert parse_since("24h", now=100_000.0) == 100_000.0 - 86_400
    assert parse_since("30m", now=1000.0) == -800.0
    assert parse_since("1700000000") == 1_700_000_000.0
    assert parse_since("2024-01-01T00:00:00Z") == 1_704_067_200.0
    assert parse_since("2024-01-01") == 1_704_067_200.0  # no offset: UTC
    with pytest.raises(ValueError, match="24h"):
        parse_since("yesterday")


def test_redacted_call_correction_is_dropped(tok) -> None:
    """A correction on a call whose tokens were redacted has no prompt to pair it with."""
    from agentkiln.models import Rollout, Span
    from agentkiln.production.dataset import SessionData
    from agentkiln.protocol import LLMCall, SpanNames

    span = Span(rollout_id="s", attempt_id="live", name=SpanNames.llm_call, sequence_id=1, span_id="x",
                attributes=LLMCall(call_id="c", response={"choices": []}, redacted=True).attributes())
    fb = Feedback(feedback_id="f", response_id="c", rollout_id="s", resolved_span_id="x", value=False,
                  correction="better")
    data = build_dataset([SessionData(Rollout(rollout_id="s"), [span], [fb])], 0.0, DatasetConfig(), tok)
    assert data.dpo == [] and data.report.dpo.dropped == {"redacted": 1}
    assert data.report.calls.dropped == {"redacted": 1}
