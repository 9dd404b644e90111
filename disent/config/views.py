"""The resolved config as plain data: dotted access, a dict, YAML, flat MLflow params, and the keys that
differ between two configs."""
from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from disent.config.schema import Config


def get_dotted(cfg: Any, dotted: str) -> Any:
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain data (what `config show` prints and checkpoints store)."""
    out = dataclasses.asdict(cfg)
    out.pop("source", None)
    out.pop("overrides", None)
    return out


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys for MLflow params: {'model.z_dim': 16, ...}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def changed_keys(saved: dict, current: dict) -> list[str]:
    """The dotted keys whose values differ between two config dicts (tracking.* and train.progress
    aside: they do not change what a run computes)."""
    a, b = flatten(saved), flatten(current)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith(("tracking.", "train.progress")))
