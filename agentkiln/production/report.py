"""The report of a production data set: how many went where, and why the rest was left out.

Kept apart from the building code (agentkiln/production/dataset.py) because it is also the wire
shape of the JSON written beside a trained adapter and printed by `kiln train-offline`.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field


class Drop(str, Enum):
    """Why a call, a piece of feedback or a candidate example was left out."""

    # calls
    no_feedback = "no_feedback"
    redacted = "redacted"  # text redacted before storing: no token ids to train on
    no_token_ids = "no_token_ids"
    empty_prompt = "empty_prompt"
    empty_response = "empty_response"
    agent_not_selected = "agent_not_selected"
    truncated = "truncated"
    # feedback
    name_not_selected = "name_not_selected"
    unknown_label = "unknown_label"
    superseded = "superseded"  # a later feedback on the same target replaced it
    call_not_in_window = "call_not_in_window"  # its call is older than `since` (or unknown)
    # SFT
    below_threshold = "below_threshold"
    # GRPO (plus the adapter's no_logprobs / bad_logprobs / unreproducible_sampling)
    zero_advantage = "zero_advantage"
    # DPO
    no_tokenizer = "no_tokenizer"
    correction_equals_response = "correction_equals_response"
    empty_correction = "empty_correction"
    tie = "tie"  # two answers to one prompt rated alike
    pair_cap = "pair_cap"


class SetReport(BaseModel):
    """How many went into one set, and how many were left out by reason."""

    model_config = ConfigDict(extra="forbid")

    used: int = 0
    dropped: dict[str, int] = Field(default_factory=dict)

    def drop(self, reason: Drop | str, n: int = 1) -> None:
        key = reason.value if isinstance(reason, Enum) else str(reason)
        self.dropped[key] = self.dropped.get(key, 0) + n


class DPOReport(SetReport):
    from_corrections: int = 0
    from_ratings: int = 0


class GRPOReport(SetReport):
    groups: int = 0  # prompts answered (and rated) more than once
    baseline: int = 0  # calls compared against the shared baseline instead


class DatasetReport(BaseModel):
    """What the window held and where each part went; written beside the trained adapter."""

    model_config = ConfigDict(extra="forbid")

    since: float
    sessions: int = 0
    calls: SetReport = Field(default_factory=SetReport)  # used: rated calls with token ids
    feedback: SetReport = Field(default_factory=SetReport)  # used: the rating in force, or a correction
    sft: SetReport = Field(default_factory=SetReport)
    dpo: DPOReport = Field(default_factory=DPOReport)
    grpo: GRPOReport = Field(default_factory=GRPOReport)
    model_versions: dict[str, int] = Field(default_factory=dict)  # of the rated calls: how off-policy the data is
