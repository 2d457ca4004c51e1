"""Build a configuration dataclass from dotted field names, e.g. ``config.lora.r=8``.

Why: `kiln train` exposes every field of an algorithm's dataclasses (GRPO, its GRPOConfig and
LoraSettings, SFT, APO's OptimizerLLM, ...) without an option written per field and per
algorithm; named options are a table of dotted names, `--set KEY=VALUE` reaches the rest.
Values given as strings are converted with the field's type annotation.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import types
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

_TRUE, _FALSE, _NONE = ("1", "true", "yes", "on"), ("0", "false", "no", "off"), ("none", "null")


def _field_types(cls: Any) -> dict[str, Any]:
    """Field name -> annotation, for a dataclass or a pydantic model class."""
    if dataclasses.is_dataclass(cls):
        hints = get_type_hints(cls)
        return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}
    if hasattr(cls, "model_fields"):
        return {name: f.annotation for name, f in cls.model_fields.items()}
    raise TypeError(f"{cls!r} is neither a dataclass nor a pydantic model")


def _structured(hint: Any) -> Any:
    """The dataclass / pydantic class inside an annotation (Optional[LoraSettings] -> LoraSettings)."""
    for t in (hint, *get_args(hint)):
        if isinstance(t, type) and (dataclasses.is_dataclass(t) or hasattr(t, "model_fields")):
            return t
    return None


def coerce(text: str, hint: Any) -> Any:
    """`text` as a value of annotation `hint` (bool/int/float/str, Optional, Literal, sequences, JSON)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if text.strip().lower() in _NONE and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(text, arg)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError(f"{text!r}: {'; '.join(errors)}")
    if origin is Literal:
        if text not in args:
            raise ValueError(f"{text!r} is not one of {list(args)}")
        return text
    if hint is bool:
        low = text.strip().lower()
        if low not in _TRUE + _FALSE:
            raise ValueError(f"{text!r} is not a boolean")
        return low in _TRUE
    if hint in (int, float, str):
        return hint(text)
    if origin in (tuple, list, collections.abc.Sequence) and not text.startswith("["):
        item = args[0] if args else str
        values = [coerce(part.strip(), item) for part in text.split(",") if part.strip()]
        return tuple(values) if origin is tuple else values
    if _structured(hint) is not None and text.strip().lower() in _NONE:
        return None
    return json.loads(text)


def build(cls: Any, values: Mapping[str, Any], base: Any = None) -> Any:
    """An instance of `cls` (or a copy of `base`) with the dotted `values` set; strings are coerced.

    Nested configurations start from the field's current value (or its default) and are
    rebuilt, so `config.lr` changes only the learning rate of a default GRPOConfig.
    """
    types_ = _field_types(cls)
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        name, _, rest = key.partition(".")
        if name not in types_:
            raise KeyError(f"{cls.__name__} has no setting {name!r} (known: {', '.join(sorted(types_))})")
        if rest:
            nested.setdefault(name, {})[rest] = value
        else:
            top[name] = coerce(value, types_[name]) if isinstance(value, str) and types_[name] is not str else value
    for name, sub in nested.items():
        inner = _structured(types_[name])
        if inner is None:
            raise KeyError(f"{cls.__name__}.{name} has no settings inside it")
        current = top.get(name, getattr(base, name, None) if base is not None else _default(cls, name))
        top[name] = build(inner, sub, current)
    if base is None:
        return cls(**top)
    if dataclasses.is_dataclass(base):
        return dataclasses.replace(base, **top)
    return base.model_copy(update=top)


def _default(cls: Any, name: str) -> Any:
    """The default value of field `name` (None when it has none)."""
    if dataclasses.is_dataclass(cls):
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
        return None if f.default is dataclasses.MISSING else f.default
    return cls.model_fields[name].get_default(call_default_factory=True)


def parse_assignments(pairs: list[str]) -> dict[str, str]:
    """["config.kl_coef=0.05", ...] -> {"config.kl_coef": "0.05"}."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        out[key.strip()] = value
    return out
