"""Span -> transition adapter: selection, skip reasons, attempts, merging, export."""

from __future__ import annotations

from pathlib import Path

from agentkiln.adapter.credit import CreditConfig
from agentkiln.adapter.export import from_dataset, read_jsonl, to_dataset, write_jsonl
from agentkiln.adapter.transitions import build_batch, build_transitions
from agentkiln.models import Attempt, AttemptStatus, Rollout, Span
from agentkiln.protocol import SpanAttrs, SpanNames


def llm(seq: int, prompt, resp, *, agent="solver", aid="a2", rid="r1", logprobs=None, finish="stop", **extra) -> Span:
    attrs = {
        SpanAttrs.prompt_token_ids: list(prompt),
        SpanAttrs.response_token_ids: list(resp),
        SpanAttrs.response_logprobs: list(logprobs)
        if logprobs is not None
        else [-0.1 * (i + 1) for i in range(len(resp))],
        SpanAttrs.agent_name: agent,
        SpanAttrs.finish_reason: finish,
        SpanAttrs.model_version: "v3",
    }
    attrs.update(extra)
    return Span(rollout_id=rid, attempt_id=aid, name=SpanNames.llm_call, sequence_id=seq, attributes=attrs)


def reward(seq: int, value: float, *, aid="a2", rid="r1") -> Span:
    return Span(
        rollout_id=rid,
        attempt_id=aid,
        name=SpanNames.reward,
        sequence_id=seq,
        attributes={SpanAttrs.reward_value: value, SpanAttrs.reward_final: True},
    )


ROLLOUT = Rollout(rollout_id="r1", input={"task": "add"}, metadata={"group_id": "g1"})
ATTEMPTS = [
    Attempt(attempt_id="a1", rollout_id="r1", sequence_id=1, status=AttemptStatus.failed),
    Attempt(attempt_id="a2", rollout_id="r1", sequence_id=2, status=AttemptStatus.succeeded),
]


def reasons(result) -> list[tuple[int, str]]:
    return [(s.sequence_id, s.reason.value) for s in result.report]


def test_one_transition_per_call_in_order() -> None:
    spans = [reward(4, 1.0), llm(3, [1, 2, 3], [9]), llm(1, [1], [5, 6])]
    res = build_transitions(ROLLOUT, ATTEMPTS, spans)
    assert [(t.step, t.prompt_ids, t.response_ids) for t in res.transitions] == [(0, [1], [5, 6]), (1, [1, 2, 3], [9])]
    t0 = res.transitions[0]
    assert t0.logprobs == [-0.1, -0.2] and t0.response_mask == [1, 1]
    assert t0.attempt_id == "a2" and t0.group_id == "g1" and t0.model_version == "v3" and t0.agent == "solver"
    assert [t.done for t in res.transitions] == [False, True]
    assert res.report == []


def test_agent_regex_selection() -> None:
    spans = [
        llm(1, [1], [2], agent="planner"),
        llm(2, [1], [3], agent="solver-v2"),
        llm(3, [1], [4], agent=None),
        reward(4, 1.0),
    ]
    spans[2].attributes.pop(SpanAttrs.agent_name)
    res = build_transitions(ROLLOUT, ATTEMPTS, spans, agent_match=r"^solver")
    assert [t.response_ids for t in res.transitions] == [[3]]
    assert reasons(res) == [(1, "agent_not_selected"), (3, "agent_not_selected")]
    everything = build_transitions(ROLLOUT, ATTEMPTS, spans)
    assert len(everything.transitions) == 3


def test_skip_reasons() -> None:
    spans = [
        llm(1, [1], [2]),
        Span(
            rollout_id="r1",
            attempt_id="a2",
            name=SpanNames.llm_call,
            sequence_id=2,
            attributes={SpanAttrs.agent_name: "solver"},
        ),
        llm(3, [1], []),
        llm(4, [1], [2, 3], logprobs=[-0.1]),
        llm(5, [1], [2], logprobs=[float("-inf")]),
        llm(6, [1], [7, 8], finish="length"),
        llm(7, [], [2]),
        llm(8, [1], [2], **{SpanAttrs.response_logprobs: None}),
        reward(9, 1.0),
    ]
    res = build_transitions(ROLLOUT, ATTEMPTS, spans, keep_truncated=False)
    assert reasons(res) == [
        (2, "no_token_ids"),
        (3, "empty_response"),
        (4, "bad_logprobs"),
        (5, "bad_logprobs"),
        (6, "truncated"),
        (7, "empty_prompt"),
        (8, "no_logprobs"),
    ]
    assert len(res.transitions) == 1
    kept = build_transitions(ROLLOUT, ATTEMPTS, spans, keep_truncated=True)
    assert [t.response_ids for t in kept.transitions] == [[2], [7, 8]]


def test_failed_and_stale_attempts_are_ignored() -> None:
    attempts = ATTEMPTS + [Attempt(attempt_id="a0", rollout_id="r1", sequence_id=0, status=AttemptStatus.succeeded)]
    spans = [
        llm(1, [1], [2], aid="a1"),  # failed attempt
        llm(2, [1], [3], aid="a1"),
        reward(3, 5.0, aid="a1"),
        llm(1, [1], [4], aid="a0"),  # an older succeeded attempt, superseded
        llm(1, [1], [5], aid="a9"),  # unknown attempt
        llm(1, [1], [6], rid="other", aid="a2"),  # another rollout's span
        llm(1, [1], [7]),
        reward(2, 1.0),
    ]
    res = build_transitions(ROLLOUT, attempts, spans)
    assert [t.response_ids for t in res.transitions] == [[7]]
    assert res.rollout_return == 1.0  # the failed attempt's reward does not leak in
    assert sorted((s.attempt_id, s.reason.value) for s in res.report) == [
        ("a0", "stale_attempt"),
        ("a1", "failed_attempt"),
        ("a1", "failed_attempt"),
        ("a9", "stale_attempt"),
    ]


def test_latest_attempt_not_succeeded_yields_nothing() -> None:
    running = [ATTEMPTS[0], Attempt(attempt_id="a2", rollout_id="r1", sequence_id=2, status=AttemptStatus.unresponsive)]
    res = build_transitions(ROLLOUT, running, [llm(1, [1], [2]), reward(2, 1.0)])
    assert res.transitions == [] and res.rollout_return is None
    assert reasons(res) == [(1, "unfinished_attempt")]
    failed = [ATTEMPTS[0], Attempt(attempt_id="a2", rollout_id="r1", sequence_id=2, status=AttemptStatus.timeout)]
    assert reasons(build_transitions(ROLLOUT, failed, [llm(1, [1], [2])])) == [(1, "failed_attempt")]


def test_merge_continuing_turns_masks_inserted_tokens() -> None:
    p1, r1 = [10, 11], [20, 21]
    tool = [30, 31, 32]  # tool result + template tokens the model did not sample
    p2 = p1 + r1 + tool
    r2 = [40]
    p3 = [99, 98]  # a fresh context: not a continuation
    spans = [
        llm(1, p1, r1, logprobs=[-1.0, -2.0]),
        llm(2, p2, r2, logprobs=[-3.0]),
        llm(3, p3, [50], logprobs=[-4.0]),
        reward(4, 1.0),
    ]
    res = build_transitions(ROLLOUT, ATTEMPTS, spans, merge=True)
    assert len(res.transitions) == 2
    m = res.transitions[0]
    assert m.prompt_ids == p1
    assert m.response_ids == r1 + tool + r2
    assert m.response_mask == [1, 1, 0, 0, 0, 1]
    assert m.logprobs == [-1.0, -2.0, 0.0, 0.0, 0.0, -3.0]
    assert (m.step, m.done) == (0, False)
    assert (res.transitions[1].step, res.transitions[1].done, res.transitions[1].response_ids) == (1, True, [50])
    # Three-way chain and no merge across agents.
    p4 = p2 + r2 + [33]
    chain = build_transitions(
        ROLLOUT,
        ATTEMPTS,
        [llm(1, p1, r1), llm(2, p2, r2), llm(3, p4, [41]), llm(4, p4 + [41], [42], agent="other")],
        merge=True,
    )
    assert [t.response_mask for t in chain.transitions] == [[1, 1, 0, 0, 0, 1, 0, 1], [1]]
    unmerged = build_transitions(ROLLOUT, ATTEMPTS, spans, merge=False)
    assert len(unmerged.transitions) == 3


def test_merged_discounted_rewards_sum_within_merged_step() -> None:
    p1, r1 = [1], [2]
    spans = [
        llm(1, p1, r1),
        Span(
            rollout_id="r1",
            attempt_id="a2",
            name=SpanNames.reward,
            sequence_id=2,
            attributes={SpanAttrs.reward_value: 0.5},
        ),
        llm(3, p1 + r1 + [3], [4]),
        reward(4, 1.0),
    ]
    res = build_transitions(ROLLOUT, ATTEMPTS, spans, merge=True, credit=CreditConfig(mode="discounted", gamma=0.9))
    assert len(res.transitions) == 1
    assert res.transitions[0].reward == 1.5 and res.transitions[0].return_ == 1.5


def test_build_batch_assigns_group_advantages() -> None:
    items = []
    for i, value in enumerate([1.0, 0.0]):
        rid = f"q{i}"
        ro = Rollout(rollout_id=rid, input={"task": "same"})
        at = [Attempt(attempt_id=f"{rid}a", rollout_id=rid, sequence_id=1, status=AttemptStatus.succeeded)]
        items.append((ro, at, [llm(1, [1], [2], rid=rid, aid=f"{rid}a"), reward(2, value, rid=rid, aid=f"{rid}a")]))
    transitions, report = build_batch(items)
    assert report == []
    assert transitions[0].group_id == transitions[1].group_id
    assert [round(t.advantage, 4) for t in transitions] == [1.0, -1.0]


def test_export_jsonl_and_dataset_round_trip(tmp_path: Path) -> None:
    spans = [llm(1, [10, 11], [20, 21]), llm(2, [10, 11, 20, 21, 30], [40]), reward(3, 0.5)]
    transitions, _ = build_batch([(ROLLOUT, ATTEMPTS, spans)], merge=True)
    transitions += build_transitions(ROLLOUT, ATTEMPTS, spans).transitions
    path = tmp_path / "out" / "t.jsonl"
    assert write_jsonl(transitions, path) == 3
    first_line = path.read_text().splitlines()[0]
    assert '"return": 0.5' in first_line and "return_" not in first_line
    back = read_jsonl(path)
    assert back == transitions
    ds = to_dataset(transitions)
    assert ds.num_rows == 3 and "return" in ds.column_names and ds[0]["response_mask"] == [1, 1, 0, 1]
    assert from_dataset(ds) == transitions
    assert to_dataset([]).num_rows == 0
