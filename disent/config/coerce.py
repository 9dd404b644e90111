"""YAML values into the schema's typed dataclasses, with messages that name the key, the file it came
from, the type expected and, for a typo, the closest valid key."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal

from disent.config.schema import ConfigError

_YAML11_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _where(dotted: str, origins: dict[str, str]) -> str:
    origin = origins.get(dotted)
    return f" (from {origin})" if origin else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(item)}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, dotted: str, origins: dict[str, str]) -> Any:
    def wrong() -> ConfigError:
        return ConfigError(
            f"config key '{dotted}'{_where(dotted, origins)} must be {_type_name(tp)}, "
            f"but the value given is {value!r} ({type(value).__name__})"
        )

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise wrong()
        return build(tp, value, dotted + ".", origins)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(option, value, dotted, origins)
            except ConfigError:
                continue
        raise wrong()
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise wrong()
        return value
    if origin is list:
        if not isinstance(value, list):
            raise wrong()
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(item, v, f"{dotted}[{i}]", origins) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong()
        return copy.deepcopy(value)
    if tp is Any:
        return value
    if tp is type(None):
        if value is not None:
            raise wrong()
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong()
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value):
            return float(value)  # PyYAML reads 1e-3 (no dot) as a string; everyone means a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise wrong()
        return value
    raise TypeError(f"unsupported config type {tp!r} for {dotted}")


def build(cls: type, raw: dict, prefix: str, origins: dict[str, str]) -> Any:
    hints = typing.get_type_hints(cls)
    public = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in raw:
        if key not in public:
            dotted = f"{prefix}{key}"
            close = difflib.get_close_matches(str(key), list(public), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys here: {', '.join(public)}"
            raise ConfigError(f"unknown config key '{dotted}'{_where(dotted, origins)}{hint}")
    kwargs = {}
    for key, spec in public.items():
        dotted = f"{prefix}{key}"
        if key in raw:
            kwargs[key] = _coerce(hints[key], raw[key], dotted, origins)
        elif dataclasses.is_dataclass(hints[key]):
            kwargs[key] = build(hints[key], {}, dotted + ".", origins)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(
                f"missing required config key '{dotted}': set it in the YAML file or on the command line "
                f"as {dotted}=VALUE"
            )
    return cls(**kwargs)
