"""OpenTelemetry GenAI evaluation events arriving on `/v1/traces`, as feedback.

The GenAI semantic conventions record an evaluator's verdict as an event `gen_ai.evaluation.result`
with `gen_ai.evaluation.name` (required), `gen_ai.evaluation.score.value` (a number) and/or
`gen_ai.evaluation.score.label` (a string), `gen_ai.evaluation.explanation`, and
`gen_ai.response.id` (the evaluated completion, when the event cannot sit on its span); an event
with `error.type` reports an evaluator that failed and carries no verdict. Each such event becomes
a FeedbackIn with source "otlp": name = the evaluation name, value = the score (else the label),
comment = the explanation, target = the response id (on the event, else on its span), or else the
span carrying the event when that span is recorded in a rollout. Its client id is derived from
(trace id, span id, event index), so an exporter re-sending a batch stores each verdict once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from fastapi import HTTPException
from pydantic import ValidationError

from agentkiln.models import FeedbackIn

EVENT = "gen_ai.evaluation.result"
NAME = "gen_ai.evaluation.name"
SCORE_VALUE = "gen_ai.evaluation.score.value"
SCORE_LABEL = "gen_ai.evaluation.score.label"
EXPLANATION = "gen_ai.evaluation.explanation"
RESPONSE_ID = "gen_ai.response.id"
ERROR_TYPE = "error.type"


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _score(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def has_evaluations(events: Sequence[tuple[str, dict[str, Any]]]) -> bool:
    return any(name == EVENT for name, _ in events)


def evaluation_feedback(
    events: Sequence[tuple[str, dict[str, Any]]],
    span_attributes: dict[str, Any],
    *,
    trace_id: str,
    span_id: str,
    rollout_id: str | None,
) -> list[FeedbackIn]:
    """The feedback of one span's evaluation events; 400 for an event that cannot be one.

    `rollout_id` is the rollout the span itself is stored in (None: it is not stored), the
    fallback target of an event that names no response.
    """
    out = []
    for index, (name, attrs) in enumerate(events):
        if name != EVENT or ERROR_TYPE in attrs:
            continue
        where = f"event {EVENT} #{index} of span {span_id or '?'}"
        evaluation = _text(attrs.get(NAME))
        if evaluation is None:
            raise HTTPException(400, f"{where}: {NAME} is required")
        score, label = _score(attrs.get(SCORE_VALUE)), _text(attrs.get(SCORE_LABEL))
        if score is None and label is None:
            raise HTTPException(400, f"{where}: give {SCORE_VALUE} (a number) or {SCORE_LABEL} (a string)")
        response_id = _text(attrs.get(RESPONSE_ID)) or _text(span_attributes.get(RESPONSE_ID))
        if response_id is not None:
            target: dict[str, Any] = {"response_id": response_id}
        elif rollout_id is not None:
            target = {"span_id": span_id, "rollout_id": rollout_id}
        else:
            raise HTTPException(
                400, f"{where} names no response: set {RESPONSE_ID}, or export its span with kiln.rollout_id"
            )
        try:
            out.append(
                FeedbackIn(
                    **target,
                    name=evaluation,
                    value=score if score is not None else label,
                    comment=_text(attrs.get(EXPLANATION)),
                    client_id=f"otlp:{trace_id}:{span_id}:{index}",
                    source="otlp",
                    metadata={"label": label} if score is not None and label is not None else {},
                )
            )
        except ValidationError as exc:
            raise HTTPException(400, f"{where}: {exc.errors()[0].get('msg', exc)}") from None
    return out
