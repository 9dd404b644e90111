"""One YAML config, validated into typed dataclasses before any work starts.

Files may name a parent with ``extends: base.yaml`` (resolved relative to the file);
command lines add ``section.key=value`` overrides whose values are parsed as YAML.
Every key remembers where it came from so an error can name the file to fix.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from disent.errors import InputError
from disent.models.loss_weights import LossWeights

OVERRIDE_ORIGIN = "the command line"
_YAML11_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(InputError):
    """A config problem a user must fix; the CLI prints it without a traceback and exits 2."""


# --------------------------------------------------------------------------- schema


@dataclass
class DataConfig:
    url: str  # required: directory or s3://bucket/prefix holding <split>/manifest.json
    train_split: str = "train"
    eval_split: str = "test"
    image_size: int = 28
    channels: int = 1
    num_classes: int = 10
    shuffle_buffer: int = 8192  # samples each stream's pool is refilled to, for re-pairing across groups
    streams: int | Literal["auto"] = "auto"  # canonical streams that make the epoch's order; see resolve_num_streams
    num_workers: int | Literal["auto"] = "auto"  # DataLoader workers per rank; auto: see resolve_num_workers
    prefetch_factor: int = 4
    on_error: Literal["raise", "skip"] = "raise"
    verify_checksums: bool = False  # sha256 of every shard read; costs one extra hash pass


@dataclass
class ModelConfig:
    s_dim: int = 16  # specified code: carries the class
    z_dim: int = 16  # unspecified variational code: carries everything else
    base_channels: int = 32
    discriminator: Literal["pair", "label"] = "pair"
    disc_channels: int = 32
    # transposed: stride-2 transposed convs (the authors'); upsample: nearest 2x then a 3x3 conv, which
    # has no checkerboard pattern (Odena et al., 2016)
    decoder: Literal["transposed", "upsample"] = "transposed"


@dataclass
class OptimizerConfig:
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 0


@dataclass
class OptimConfig:
    vae: OptimizerConfig = field(default_factory=OptimizerConfig)
    disc: OptimizerConfig = field(default_factory=OptimizerConfig)


@dataclass
class TrainConfig:
    steps: int = 1000
    global_batch_size: int = 64
    grad_accum: int = 1
    zero_stage: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_clip: float = 1.0
    log_every: int = 20
    eval_every: int = 500
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    checkpoint_upload_url: str | None = None  # s3://bucket/prefix to copy completed checkpoints to
    compile: bool = False
    profile_steps: int = 0  # > 0: torch.profiler traces that many steps after a short warm-up
    channels_last: bool = False
    progress: bool = True
    # auto: cuda when torch sees a GPU, else cpu. DeepSpeed's accelerator is set to the same choice.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: on for cpu (a resume is bit-exact), off for cuda (cuDNN autotuning; see docs/training.md)
    deterministic: bool | Literal["auto"] = "auto"
    stop_check_every: int = 10  # steps between the ranks' agreement on a stop signal (a device sync on GPU)
    collective_timeout_s: int = 600  # a collective waiting longer than this fails the run with 69 (NCCL and gloo)


@dataclass
class DeepSpeedPassThrough:
    """Advanced DeepSpeed keys merged last into each engine's generated config."""

    vae: dict[str, Any] = field(default_factory=dict)
    disc: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "disent"
    run_name: str | None = None  # None: the config name plus the key overrides
    system_metrics: bool = True
    log_model: bool = True  # a finished run logs its MLflow model (pyfunc) as the artifact "model"
    register_model: str | None = None  # also register it in the Model Registry under this name
    parent_run_id: str | None = None  # a child run of this run (disent sweep sets it for each point)


@dataclass
class EvalConfig:
    max_train_samples: int = 5000
    max_test_samples: int = 2000
    probe_epochs: int = 30
    grid_size: int = 8
    # the other ranks wait this long for rank 0's in-training evaluation (on a CPU group, so the
    # NCCL collective timeout does not apply to it); past it they fail with 69
    timeout_s: int = 3600


@dataclass
class Config:
    name: str  # required: names the run in MLflow
    seed: int = 0
    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=lambda: DataConfig(url=""))
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedPassThrough = field(default_factory=DeepSpeedPassThrough)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Not validated input: the CLI records what the user asked for, for run names and logs.
    source: str | None = field(default=None, metadata={"internal": True})
    overrides: list[str] = field(default_factory=list, metadata={"internal": True})


# --------------------------------------------------------------------------- loading


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
        merged = _load_with_parents(path.parent / parent_name, origins, (*seen, path))
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
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        raw = _deep_merge(raw, nested, origins, OVERRIDE_ORIGIN)
    return raw


def _finish(raw: dict, origins: dict[str, str], source: str | None, overrides: list[str]) -> Config:
    cfg = _build(Config, raw, "", origins)
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


# --------------------------------------------------------------------------- typed building


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
        return _build(tp, value, dotted + ".", origins)
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


def _build(cls: type, raw: dict, prefix: str, origins: dict[str, str]) -> Any:
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
            kwargs[key] = _build(hints[key], {}, dotted + ".", origins)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(
                f"missing required config key '{dotted}': set it in the YAML file or on the command line "
                f"as {dotted}=VALUE"
            )
    return cls(**kwargs)


# --------------------------------------------------------------------------- semantic checks


def _positive(cfg: Config, *dotted_keys: str) -> None:
    for dotted in dotted_keys:
        value = get_dotted(cfg, dotted)
        if value <= 0:
            raise ConfigError(f"config key '{dotted}' must be > 0, got {value!r}")


# URLs a config may hold; `scheme://user[:password]@host` in any of them is refused (a secret in a
# config would be written to run_dir/config.yaml, every checkpoint's meta.json and MLflow).
_URL_KEYS = ("data.url", "tracking.uri", "train.checkpoint_upload_url")
URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def redact_url_credentials(value: str) -> str:
    """`scheme://user:password@host` -> `scheme://***@host`, anywhere inside value."""
    return URL_CREDENTIALS.sub(lambda m: m.group("scheme") + "***@", value)


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Checks across keys. With world_size, also checks that the batch splits evenly over ranks."""
    _positive(
        cfg,
        "data.image_size", "data.channels", "data.num_classes", "data.shuffle_buffer",
        "data.prefetch_factor", "model.s_dim", "model.z_dim", "model.base_channels",
        "model.disc_channels", "train.steps", "train.global_batch_size", "train.grad_accum",
        "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
        "train.stop_check_every", "train.collective_timeout_s", "eval.timeout_s", "optim.vae.lr", "optim.disc.lr",
    )
    if cfg.data.image_size not in (28, 32, 64):
        raise ConfigError(f"config key 'data.image_size' must be 28, 32 or 64, got {cfg.data.image_size}")
    if cfg.data.channels not in (1, 3):
        raise ConfigError(f"config key 'data.channels' must be 1 or 3, got {cfg.data.channels}")
    if cfg.data.num_workers != "auto" and cfg.data.num_workers < 0:
        raise ConfigError(f"config key 'data.num_workers' must be >= 0 or auto, got {cfg.data.num_workers}")
    if cfg.data.streams != "auto" and cfg.data.streams < 1:
        raise ConfigError(f"config key 'data.streams' must be >= 1 or auto, got {cfg.data.streams}")
    if cfg.model.base_channels % 8:
        raise ConfigError(
            f"config key 'model.base_channels' must be a multiple of 8 (GroupNorm uses 8 groups), "
            f"got {cfg.model.base_channels}"
        )
    if cfg.train.zero_stage not in (0, 1, 2):
        raise ConfigError(f"config key 'train.zero_stage' must be 0, 1 or 2, got {cfg.train.zero_stage}")
    if cfg.train.channels_last and cfg.train.zero_stage > 0:
        raise ConfigError(
            f"config key 'train.channels_last' needs train.zero_stage=0, got zero_stage {cfg.train.zero_stage}: "
            "ZeRO keeps parameters as views of one contiguous buffer, which channels_last would detach them from"
        )
    if not 0.0 < cfg.loss.real_label <= 1.0:
        raise ConfigError(f"config key 'loss.real_label' must be in (0, 1], got {cfg.loss.real_label}")
    for name in ("vae", "disc"):
        betas = cfg.optim.__dict__[name].betas
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"config key 'optim.{name}.betas' must be two numbers in [0, 1), got {betas}")
    if cfg.train.checkpoint_upload_url and not cfg.train.checkpoint_upload_url.startswith("s3://"):
        raise ConfigError(
            f"config key 'train.checkpoint_upload_url' must be an s3:// URL, got {cfg.train.checkpoint_upload_url!r}"
        )
    for dotted in _URL_KEYS:
        value = get_dotted(cfg, dotted)
        if isinstance(value, str) and URL_CREDENTIALS.match(value):
            shown = redact_url_credentials(value)
            raise ConfigError(
                f"config key '{dotted}' holds credentials in its URL ({shown}); configs are written to run_dir, "
                "checkpoints and MLflow, so secrets never go in them. Remove the user:password@ part and pass "
                "credentials through the environment (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or "
                "MLFLOW_TRACKING_TOKEN for MLflow; AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN "
                "or AWS_PROFILE for S3)"
            )
    if world_size is not None:
        per_step = world_size * cfg.train.grad_accum
        if cfg.train.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by world size "
                f"({world_size}) x train.grad_accum ({cfg.train.grad_accum}) = {per_step}; "
                f"choose a multiple of {per_step}"
            )


def micro_batch_size(cfg: Config, world_size: int) -> int:
    validate(cfg, world_size)
    return cfg.train.global_batch_size // (world_size * cfg.train.grad_accum)


# --------------------------------------------------------------------------- views


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


def run_name(cfg: Config) -> str:
    """The config name plus the overrides that matter, so MLflow's compare view reads well."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    noisy = ("tracking.", "run_dir", "data.url", "train.progress", "train.checkpoint_upload_url")
    keep = [o for o in cfg.overrides if not o.startswith(noisy)]
    if any(o.startswith("data.url=") for o in cfg.overrides):  # runs on other data must not share a name
        keep.append("data=" + redact_url_credentials(cfg.data.url).rstrip("/").rsplit("/", 1)[-1])
    return " ".join([cfg.name, *keep])


def changed_keys(saved: dict, current: dict) -> list[str]:
    """The dotted keys whose values differ between two config dicts (tracking.* and train.progress
    aside: they do not change what a run computes)."""
    a, b = flatten(saved), flatten(current)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith(("tracking.", "train.progress")))
