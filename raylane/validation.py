"""Turning plain config dicts into typed dataclasses, with one-line user errors.

`from_dict(cls, data, prefix)` builds `cls` from `data`: unknown keys, wrong types and
(through the dataclass's own `validate(prefix)`) values out of range raise
`ConfigError("cluster.num_workers=0: must be >= 1")` — the key, the value, what is allowed.
Imports nothing of raylane: every layer may use it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Iterable


class ConfigError(ValueError):
    """A user error in the config; its message is one line naming key, value and what is allowed."""


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ConfigError("key=value: allowed") unless ok."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: {allowed}")


def one_of(key: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    check(value in choices, key, value, f"choose one of {choices}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin in (list, tuple):
        check(isinstance(value, (list, tuple)), key, value, "must be a list")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        check(isinstance(value, dict), key, value, "must be a mapping")
        return dict(value)
    if tp is bool:
        check(isinstance(value, bool), key, value, "must be true or false")
        return value
    if tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), key, value, "must be an integer")
        return value
    if tp is float:
        check(isinstance(value, (int, float)) and not isinstance(value, bool), key, value, "must be a number")
        return float(value)
    if tp is str:
        check(isinstance(value, str), key, value, "must be a string")
        return value
    if dataclasses.is_dataclass(tp):
        check(isinstance(value, dict), key, value, "must be a mapping")
        return from_dict(tp, value, key)
    return value


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str) -> Any:
    """Build dataclass `cls` from `data`, checking keys and types, then call `validate(prefix)`."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        check(key in names, f"{prefix}.{key}", data[key], f"unknown key; allowed keys: {sorted(names)}")
    kwargs = {k: _coerce(f"{prefix}.{k}", v, hints[k]) for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate(prefix)
        except ConfigError:
            raise
        except ValueError as e:  # a component's own check (e.g. the comm layer's): still a user error
            raise ConfigError(str(e)) from None
    return obj
