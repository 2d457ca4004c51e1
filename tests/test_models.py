import pytest
from pydantic import ValidationError

from agentkiln.models import PromptTemplate, RolloutConfig, RolloutStatus, SpanIn, Transition


def test_rollout_status_groups():
    assert RolloutStatus.succeeded.finished and not RolloutStatus.running.finished
    assert RolloutStatus.requeuing.waiting and RolloutStatus.queuing.waiting
    assert not RolloutStatus.running.waiting


def test_config_rejects_bad_values():
    with pytest.raises(ValidationError):
        RolloutConfig(max_attempts=0)
    with pytest.raises(ValidationError):
        RolloutConfig(timeout_s=-1)
    with pytest.raises(ValidationError):
        RolloutConfig(retry_on=["not-a-kind"])


def test_span_rejects_unknown_fields():
    with pytest.raises(ValidationError):
        SpanIn(rollout_id="r", attempt_id="a", name="x", bogus=1)


def test_prompt_template_formats():
    assert PromptTemplate(template="Q: {q}").format(q="1+1") == "Q: 1+1"
    assert PromptTemplate(template="Q: {{ q }}", engine="jinja").format(q="2") == "Q: 2"


def test_transition_return_alias():
    t = Transition(rollout_id="r", attempt_id="a", step=0, prompt_ids=[1], response_ids=[2], logprobs=[-0.5],
                   **{"return": 1.5})
    assert t.return_ == 1.5
    assert t.model_dump(by_alias=True)["return"] == 1.5
