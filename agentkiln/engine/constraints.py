"""What a request constrains its answer to, as one grammar both engines enforce.

A request's constraint (`ChatRequest.structured`, or `tool_choice` "required" / a named function)
becomes a `grammar_spec`; `build_grammar` turns it into an xgrammar Grammar. The embedded engine
compiles it against its tokenizer (embedded/grammar.py); the vLLM engine sends the same grammar
as EBNF text (`grammar_ebnf`, vLLM's `structured_outputs.grammar`), so both engines accept exactly
the same answers.

Forced tool calls use the Hermes markup the chat templates parse:
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, arguments following the tool's
parameter schema (strictly: no extra properties unless the schema allows them).
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from agentkiln.engine.base import ChatRequest
from agentkiln.engine.chat.tool_parsers.hermes import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from agentkiln.engine.errors import EngineRequestError

GrammarSpec = tuple[str, str]  # (kind, source): 'json' | 'schema' | 'strict' | 'tool_call', JSON text


def grammar_spec(request: ChatRequest) -> GrammarSpec | None:
    """(kind, source) of the request's constraint, or None: 'json' (any object), 'schema', 'strict' or 'tool_call'."""
    forced = _forced_tools(request)
    if forced:
        return "tool_call", json.dumps(_tool_call_schema(forced), sort_keys=True)
    spec = request.structured
    if spec is None:
        return None
    if spec.type == "json_object" or spec.json_schema is None:
        return "json", '{"type": "object"}'
    return ("strict" if spec.strict else "schema"), json.dumps(spec.json_schema, sort_keys=True)


def _forced_tools(request: ChatRequest) -> list[dict[str, Any]]:
    """The function definitions a tool_choice forces a call to (empty: no forced call)."""
    choice, tools = request.tool_choice, request.tools
    if not tools or choice in (None, "none", "auto"):
        return []
    fns = [t.get("function", t) for t in tools]
    if choice == "required":
        return fns
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") or choice.get("name")
        named = [f for f in fns if f.get("name") == name]
        if not named:
            raise EngineRequestError(f"tool_choice names function {name!r}, which is not among the tools")
        return named
    return []


def _tool_call_schema(fns: list[dict[str, Any]]) -> dict[str, Any]:
    """A JSON schema for `{"name": <one of fns>, "arguments": <its parameters>}`."""
    options = []
    for fn in fns:
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn["name"]}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return options[0] if len(options) == 1 else {"anyOf": options}


def build_grammar(xgr: Any, spec: GrammarSpec) -> Any:
    """The xgrammar Grammar of `spec` (`xgr` is the xgrammar module, imported by the caller)."""
    kind, source = spec
    if kind in ("json", "schema", "strict"):  # strict: no properties beyond the schema's
        return xgr.Grammar.from_json_schema(source, strict_mode=kind == "strict", any_whitespace=False)
    return xgr.Grammar.concat(
        xgr.Grammar.from_regex(re.escape(TOOL_CALL_OPEN)),
        xgr.Grammar.from_json_schema(source, strict_mode=True, any_whitespace=False),
        xgr.Grammar.from_regex(re.escape(TOOL_CALL_CLOSE)),
    )


def invalid_grammar(spec: GrammarSpec, exc: BaseException) -> EngineRequestError:
    what = "tool parameters schema" if spec[0] == "tool_call" else "JSON schema"
    return EngineRequestError(f"invalid {what}: {str(exc).strip()[:500]}")


@functools.lru_cache(maxsize=64)
def grammar_ebnf(spec: GrammarSpec) -> str:
    """`spec` as EBNF text, for servers that take a grammar (vLLM); EngineRequestError for a bad schema."""
    try:
        import xgrammar
    except ImportError:
        raise EngineRequestError(
            "structured outputs need the xgrammar package on the server (pip install 'agentkiln[serve]')"
        ) from None
    try:
        return str(build_grammar(xgrammar, spec))
    except Exception as exc:  # noqa: BLE001 -- xgrammar raises assorted types for a bad schema
        raise invalid_grammar(spec, exc) from None
