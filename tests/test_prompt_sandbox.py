"""Prompt templates are data from the store: rendering one never runs code or reads internals."""

from __future__ import annotations

import os

import jinja2
import pytest

from agentkiln.models import PromptTemplate

JINJA_PAYLOADS = [
    "{{ cycler.__init__.__globals__.os.getpid() }}",
    "{{ joiner.__init__.__globals__.os.getpid() }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ q.__class__.__init__.__globals__ }}",
]


@pytest.mark.parametrize("payload", JINJA_PAYLOADS)
def test_jinja_payload_does_not_execute(payload: str) -> None:
    try:
        out = PromptTemplate(template=payload, engine="jinja").format(q="x")
    except jinja2.exceptions.SecurityError:
        return
    assert str(os.getpid()) not in out
    assert "subclasses" not in out and "function" not in out and "<class" not in out


def test_jinja_sandbox_is_immutable() -> None:
    items = [1, 2]
    with pytest.raises(jinja2.exceptions.SecurityError):
        PromptTemplate(template="{{ items.append(3) }}", engine="jinja").format(items=items)
    assert items == [1, 2]


@pytest.mark.parametrize(
    "template", ["{q.__class__}", "{q.__init__.__globals__}", "{q[0]}", "{0}", "{}", "{q:{q.__class__}}"]
)
def test_f_string_fields_must_be_plain_names(template: str) -> None:
    with pytest.raises(ValueError, match="plain names"):
        PromptTemplate(template=template).format(q="x")


def test_plain_templates_still_render() -> None:
    assert PromptTemplate(template="Q: {q!r:>5} {{literal}}").format(q="a") == "Q:   'a' {literal}"
    assert PromptTemplate(template="{% for x in xs %}{{ x }}{% endfor %}", engine="jinja").format(xs=[1, 2]) == "12"
