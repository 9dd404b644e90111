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


# ZeRO's bucket sizes default to 5e8 elements (sized for large GPU models). For models of a few
# million parameters those buffers cost far more than the model: a 2-rank ZeRO-2 run on CPU spent
# ~95% of its time allocating them (1.5 vs 150 samples/s). Buckets are sized to the model instead.
MIN_BUCKET = 1_000_000
MAX_BUCKET = 500_000_000


def bucket_size(num_params: int) -> int:
    return int(min(MAX_BUCKET, max(MIN_BUCKET, num_params)))


def deepspeed_config(
    cfg: Config, engine: str, world_size: int, device_type: str = "cpu", num_params: int | None = None
) -> dict:
    """The DeepSpeed config for engine 'vae' or 'disc'; `deepspeed.<engine>` keys are merged last.

    num_params (the engine's model size; the trainer always passes it) sizes ZeRO's communication
    buckets; without it DeepSpeed's defaults apply.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if cfg.train.precision == "fp16" and device_type == "cpu":
        raise ConfigError(
            "train.precision=fp16 needs a GPU (its loss scaling is a CUDA path); this run is on CPU. "
            "Use train.precision=bf16 or fp32 on CPU."
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
                # WarmupLR starts at warmup_min_lr and needs >= 2 warm-up steps; with a minimum of 0
                # and no warm-up asked for, the first two steps would run at lr 0 and the third at lr/2.
                # No warm-up therefore means a constant schedule: min = max.
                "warmup_min_lr": 0.0 if opt.warmup_steps > 0 else opt.lr,
                "warmup_max_lr": opt.lr,
                "warmup_num_steps": max(opt.warmup_steps, 1),
                "warmup_type": "linear",
            },
        },
        # bf16 is autocast: fp32 weights and optimizer state, matmuls and convs in bf16. The GAN-style
        # objective keeps its losses in fp32 (autocast does that for the BCE terms), and the same path
        # runs on CPU, so it is tested here.
        "torch_autocast": {"enabled": cfg.train.precision == "bf16", "dtype": "bfloat16"},
        "fp16": {"enabled": cfg.train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
    }
    if cfg.train.zero_stage > 0 and num_params is not None:
        size = bucket_size(num_params)
        ds["zero_optimization"].update({"reduce_bucket_size": size, "allgather_bucket_size": size})
    return _merge(ds, getattr(cfg.deepspeed, engine))
