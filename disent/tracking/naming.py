"""The MLflow run name of a training run: the config name plus the overrides that matter, so the compare
view reads well and runs on other data never share a name."""
from __future__ import annotations

from disent.config import Config
from disent.io.urls import redact_url_credentials


def run_name(cfg: Config) -> str:
    """The config name plus the overrides that matter, so MLflow's compare view reads well."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    noisy = ("tracking.", "run_dir", "data.url", "train.progress", "train.checkpoint_upload_url")
    keep = [o for o in cfg.overrides if not o.startswith(noisy)]
    if any(o.startswith("data.url=") for o in cfg.overrides):  # runs on other data must not share a name
        keep.append("data=" + redact_url_credentials(cfg.data.url).rstrip("/").rsplit("/", 1)[-1])
    return " ".join([cfg.name, *keep])
