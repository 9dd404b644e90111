"""A sweep's points: `key=v1,v2` arguments expanded as a grid or zipped, each point checked as a whole
config before anything is submitted, and named by exactly the values that differ between points."""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from disent.config import ConfigError, load_config


def split_values(text: str) -> list[str]:
    """`a,b,[1,2],'x,y'` -> ['a', 'b', '[1,2]', "'x,y'"]: commas inside brackets or quotes do not split."""
    values, depth, quote, current = [], 0, "", []
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append("".join(current))
            current = []
            continue
        current.append(char)
    values.append("".join(current))
    return [v.strip() for v in values]


def parse_axes(arguments: list[str]) -> dict[str, list[str]]:
    """`key=v1,v2` arguments -> {key: [v1, v2]}; a key with one value applies to every point."""
    axes: dict[str, list[str]] = {}
    for argument in arguments:
        key, sep, text = argument.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"sweep argument {argument!r} is not key=v1,v2,...; e.g. loss.adversarial=0.01,0.05")
        if key in axes:
            raise ConfigError(f"sweep key {key!r} is given twice; list all its values once: {key}=v1,v2")
        values = split_values(text)
        if not text.strip() or any(v == "" for v in values):
            raise ConfigError(f"sweep key {key!r} has an empty value list ({argument!r}); give one or more values: "
                              f"{key}=v1,v2")
        axes[key] = values
    return axes


@dataclass
class Sweep:
    config: str
    axes: dict[str, list[str]]
    mode: str = "grid"  # grid: every combination; zip: the i-th value of every key together
    base_overrides: list[str] = field(default_factory=list)  # for every point (e.g. the sweep's run_dir)

    def points(self) -> list[dict[str, str]]:
        keys = list(self.axes)
        if self.mode == "zip":
            return [dict(zip(keys, values)) for values in zip(*self.axes.values())]
        return [dict(zip(keys, values)) for values in itertools.product(*self.axes.values())]

    def varying(self) -> list[str]:
        """The keys whose value differs between points (the rest are shared settings)."""
        points = self.points()
        return [k for k in self.axes if len({p[k] for p in points}) > 1]

    def label(self, point: dict[str, str]) -> str:
        """What tells this point from the others, e.g. `loss.adversarial=0.01 model.z_dim=8`."""
        return " ".join(f"{k}={point[k]}" for k in self.varying()) or "the only point"

    def overrides(self, point: dict[str, str]) -> list[str]:
        return [*self.base_overrides, *(f"{k}={v}" for k, v in point.items())]

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "points": self.points()}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Sweep":
        raw = json.loads(text)
        return cls(raw["config"], raw["axes"], raw["mode"], raw.get("base_overrides", []))


# Keys the sweep sets for each point itself, and where a user gives them instead.
SET_BY_THE_SWEEP = {"run_dir": "--run-dir", "tracking.uri": "--tracking-uri", "tracking.run_name": "its label",
                    "tracking.parent_run_id": "its parent run"}


def build_sweep(config: str, arguments: list[str], mode: str, base_overrides: list[str] = ()) -> Sweep:
    """The sweep, with every point loaded and validated as a config (unknown keys, wrong types and
    invalid combinations are refused here, naming the key, before anything is submitted)."""
    if not Path(config).is_file():
        raise ConfigError(f"config file {config} does not exist")
    axes = parse_axes(arguments)
    for key in axes:
        if key in SET_BY_THE_SWEEP:
            raise ConfigError(f"'{key}' is set by the sweep for each point (from {SET_BY_THE_SWEEP[key]}); "
                              f"leave it out of the key=value arguments")
    if not axes:
        raise ConfigError("a sweep needs at least one key=v1,v2,... argument")
    if mode == "zip" and len({len(v) for v in axes.values()}) > 1:
        lengths = ", ".join(f"{k}: {len(v)}" for k, v in axes.items())
        raise ConfigError(f"--zip needs as many values for every key ({lengths}); use --grid for every combination")
    sweep = Sweep(str(config), axes, mode, list(base_overrides))
    for point in sweep.points():
        try:
            load_config(config, sweep.overrides(point))
        except ConfigError as exc:
            raise ConfigError(f"sweep point {sweep.label(point)!r}: {exc}") from None
    return sweep
