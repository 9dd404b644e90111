"""Each DeepSpeed engine's config, derived from the one YAML config."""
from __future__ import annotations

import copy

from disent.config import Config, ConfigError, micro_batch_size

ENGINES = ("vae", "disc")


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_config(cfg: Config, engine: str, world_size: int, device_type: str = "cpu") -> dict:
    """The DeepSpeed config for engine 'vae' or 'disc'; `deepspeed.<engine>` keys are merged last."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if cfg.train.precision != "fp32" and device_type == "cpu":
        raise ConfigError(
            f"train.precision={cfg.train.precision} needs a GPU; this run is on CPU. "
            "Use train.precision=fp32 on CPU."
        )
    opt = getattr(cfg.optim, engine)
    ds = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(cfg, world_size),
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.train.grad_clip,
        "steps_per_print": 10**9,  # progress and metrics go through our logger, not DeepSpeed's prints
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": opt.lr,
                "betas": list(opt.betas),
                "eps": 1e-8,
                "weight_decay": opt.weight_decay,
                # DeepSpeed's fused Adam kernels need CUDA; torch's implementation runs anywhere.
                "torch_adam": device_type == "cpu",
            },
        },
        "scheduler": {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": opt.lr,
                "warmup_num_steps": max(opt.warmup_steps, 1),
                "warmup_type": "linear",
            },
        },
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "fp16": {"enabled": cfg.train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
    }
    return _merge(ds, getattr(cfg.deepspeed, engine))
