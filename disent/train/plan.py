"""The run plan: what a training run derives from its config and its environment, decided once, in the preflight of
`disent train` (train/commands.py), before any process group starts, and read by everything after it.

Deciding each setting in one place also checks it in one place, with one message: the world size and rank are
read from torchrun's environment once, the device is chosen once, the batch is split into micro batches once,
both DeepSpeed configs are built once (sized for the modules' parameter counts) and the training split's
manifest is read and checked once, then handed to the loader. The trainer, the engines and the loader take
these values from the plan and derive none of them again.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from disent.checkpoint import RunLayout
from disent.config import Config, ConfigError, micro_batch_size, to_yaml
from disent.data import reading
from disent.data.manifest import Manifest
from disent.errors import RetryableFailure
from disent.io.storage import write_bytes_atomic
from disent.train import ds_config
from disent.train.distributed import DistEnv, choose_device, detect_env
from disent.train.engines import parameter_counts


@dataclass(frozen=True)
class RunPlan:
    env: DistEnv  # this rank, the world size, the local rank and the device chosen
    micro_batch: int  # pairs per rank and micro-step
    grad_accum: int  # micro-steps per optimizer step
    deepspeed: Mapping[str, dict]  # engine name ("vae", "disc") -> the DeepSpeed config it is built with
    parameters: Mapping[str, int]  # engine name -> the parameter count its config was sized for
    manifest: Manifest  # the training split's, checked against the config

    @property
    def world_size(self) -> int:
        return self.env.world_size

    def params(self) -> dict[str, int]:
        """What the run derived, beside the config's own keys in MLflow's params."""
        return {"derived.world_size": self.world_size, "derived.micro_batch_size": self.micro_batch}


def build_plan(cfg: Config, device_type: str | None = None) -> RunPlan:
    """The plan of this rank's run; raises ConfigError (exit 2) for anything a user must fix. device_type: the
    device already decided (a test harness's "cpu"); by default train.device decides it here."""
    env = detect_env(device_type or choose_device(cfg.train.device))
    micro = micro_batch_size(cfg, env.world_size)
    counts = parameter_counts(cfg)
    configs = {name: ds_config.deepspeed_config(cfg, name, env.world_size, env.device_type, counts[name],
                                                micro_batch=micro)
               for name in ds_config.ENGINES}
    return RunPlan(env=env, micro_batch=micro, grad_accum=cfg.train.grad_accum, deepspeed=MappingProxyType(configs),
                   parameters=MappingProxyType(counts), manifest=training_manifest(cfg))


def training_manifest(cfg: Config) -> Manifest:
    """The training split's manifest, read and checked against the config (disent.data.reading.check_manifest);
    whatever stops it from being used is an input error naming data.url, except storage that is unreachable for
    now (retryable)."""
    try:
        return reading.open_split(cfg.data, cfg.data.train_split)
    except (ConfigError, RetryableFailure):
        raise
    except Exception as exc:
        raise ConfigError(
            f"cannot use the training data at data.url={cfg.data.url!r} (split '{cfg.data.train_split}'): {exc}. "
            "Prepare it first (disent prepare SOURCE OUT) or fix data.url"
        ) from None


def write_plan(cfg: Config, plan: RunPlan, layout: RunLayout) -> None:
    """The resolved config (run_dir/config.yaml) and the DeepSpeed configs the engines were built with
    (run_dir/deepspeed/<engine>.json), as rank 0 writes them at the start of a run."""
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(str(layout.config), to_yaml(cfg).encode())
    layout.deepspeed_configs.mkdir(exist_ok=True)
    for name, ds_cfg in plan.deepspeed.items():
        write_bytes_atomic(str(layout.deepspeed_configs / f"{name}.json"), json.dumps(ds_cfg, indent=2).encode())
