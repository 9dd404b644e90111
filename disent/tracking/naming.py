"""How a training run is named and tagged in MLflow: its name (the config name plus the overrides that
matter, so the compare view reads well and runs on other data never share a name) and its tags (where
its code, data and software came from)."""
from __future__ import annotations

from typing import Any

import torch

from disent.config import Config
from disent.io.urls import redact_url_credentials
from disent.tracking.provenance import git_commit


def run_name(cfg: Config) -> str:
    """The config name plus the overrides that matter, so MLflow's compare view reads well."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    noisy = ("tracking.", "run_dir", "data.url", "train.progress", "train.checkpoint_upload_url")
    keep = [o for o in cfg.overrides if not o.startswith(noisy)]
    if any(o.startswith("data.url=") for o in cfg.overrides):  # runs on other data must not share a name
        keep.append("data=" + redact_url_credentials(cfg.data.url).rstrip("/").rsplit("/", 1)[-1])
    return " ".join([cfg.name, *keep])


def training_tags(cfg: Config, world_size: int, device_type: str, manifest_digest: str | None,
                  world_size_changes: dict[int, tuple[int, int]]) -> dict[str, Any]:
    """The tags a training run starts (or resumes) with; world_size_changes: {step: (written by, now)}."""
    import deepspeed  # lazy: importing DeepSpeed picks its accelerator, which train.distributed decides first

    tags = {
        "git_commit": git_commit(),
        "data_manifest_sha256": manifest_digest,
        "world_size": world_size,
        "device_type": device_type,
        "deepspeed_version": deepspeed.__version__,
        "torch_version": torch.__version__,
        "config_name": cfg.name,
        "config_source": cfg.source,
        "overrides": " ".join(cfg.overrides) or None,
    }
    for step, (before, after) in world_size_changes.items():
        tags[f"world_size_change.step_{step}"] = f"{before} -> {after}"
    if tags["git_commit"]:
        tags["mlflow.source.git.commit"] = tags["git_commit"].removesuffix("-dirty")
    if cfg.tracking.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id  # the UI nests the run under it
    return tags
