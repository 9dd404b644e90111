"""Loading a config: YAML files with their parents, overrides, then the typed build and the checks.

Files may name a parent with ``extends: base.yaml`` (resolved relative to the file);
command lines add ``section.key=value`` overrides whose values are parsed as YAML.
Every key remembers where it came from so an error can name the file to fix.
"""
from __future__ import annotations

import copy
import logging
import os
import typing
from pathlib import Path
from typing import Any

import yaml

from disent.config.checks import validate
from disent.config.coerce import build
from disent.config.schema import Config, ConfigError
from disent.io.urls import redact_url_credentials

log = logging.getLogger(__name__)

OVERRIDE_ORIGIN = "the command line"


def _load_yaml_file(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; pass a path such as configs/fashion_mnist.yaml") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, found {type(data).__name__}")
    return data


def deep_merge(base: dict, extra: dict, on_replace: typing.Callable[[str, Any], None] | None = None,
               prefix: str = "") -> dict:
    """base with extra merged in, mapping by mapping; anything else in extra replaces base's value
    (and is reported to on_replace with its dotted key). Neither input is changed."""
    out = dict(base)
    for key, value in extra.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value, on_replace, dotted + ".")
        else:
            out[key] = copy.deepcopy(value)
            if on_replace is not None:
                on_replace(dotted, value)
    return out


def _deep_merge(base: dict, extra: dict, origins: dict[str, str], origin: str) -> dict:
    return deep_merge(base, extra, lambda dotted, value: _record_origins(value, dotted, origins, origin))


def _record_origins(value: Any, dotted: str, origins: dict[str, str], origin: str) -> None:
    origins[dotted] = origin
    if isinstance(value, dict):
        for key, sub in value.items():
            _record_origins(sub, f"{dotted}.{key}", origins, origin)


def _load_with_parents(path: Path, origins: dict[str, str], seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"config files extend each other in a cycle: {chain}")
    raw = _load_yaml_file(path)
    parent_name = raw.pop("extends", None)
    merged: dict = {}
    if parent_name is not None:
        if not isinstance(parent_name, str):
            raise ConfigError(f"{path}: 'extends' must be a file name, got {parent_name!r}")
        parent = path.parent / parent_name
        if not parent.is_file():
            raise ConfigError(
                f"{path}: 'extends: {parent_name}' names {parent}, which does not exist (extends is read relative to "
                f"the file that names it); copy the config it extends beside {path.name} (the shipped ones are in "
                "the repository's configs/) or give extends a path to it")
        merged = _load_with_parents(parent, origins, (*seen, path))
    return _deep_merge(merged, raw, origins, str(path))


def parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"override {text!r} is not of the form section.key=value (for example model.z_dim=32)"
        )
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc})") from None
    return key.split("."), parsed


def _apply_overrides(raw: dict, overrides: list[str], origins: dict[str, str]) -> dict:
    given: dict[str, str] = {}
    for text in overrides:
        keys, value = parse_override(text)
        dotted = ".".join(keys)
        if dotted in given:  # the last wins, as scripts that add to a user's overrides rely on; never silently
            log.warning("override '%s' is given twice (%s, then %s): the last one is used", dotted,
                        redact_url_credentials(given[dotted]), redact_url_credentials(text))
        given[dotted] = text
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        raw = _deep_merge(raw, nested, origins, OVERRIDE_ORIGIN)
    return raw


def _finish(raw: dict, origins: dict[str, str], source: str | None, overrides: list[str]) -> Config:
    cfg = build(Config, raw, "", origins)
    cfg.source = source
    cfg.overrides = list(overrides)
    validate(cfg)
    return cfg


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Load a YAML file (and its parents), apply overrides, validate. Raises ConfigError."""
    origins: dict[str, str] = {}
    raw = _load_with_parents(Path(path), origins) if path is not None else {}
    raw = _apply_overrides(raw, overrides, origins)
    return _finish(raw, origins, str(path) if path is not None else None, overrides)


def from_dict(raw: dict, overrides: list[str] = (), origin: str = "a stored config") -> Config:
    """Rebuild a Config stored in a checkpoint, with optional overrides, validated like a file."""
    origins: dict[str, str] = {}
    raw = _deep_merge({}, raw, origins, origin)
    raw = _apply_overrides(raw, overrides, origins)
    return _finish(raw, origins, origin, overrides)
