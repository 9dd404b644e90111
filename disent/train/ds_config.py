"""Each DeepSpeed engine's config, derived from the one YAML config."""
from __future__ import annotations

from disent.config import Config, ConfigError, deep_merge, micro_batch_size

ENGINES = ("vae", "disc")


# ZeRO's bucket sizes default to 5e8 elements (sized for large GPU models). For models of a few
# million parameters those buffers cost far more than the model: a ZeRO-2 step spends most of its time
# allocating them (docs/training.md). Buckets are sized to the model instead.
MIN_BUCKET = 1_000_000
MAX_BUCKET = 500_000_000
# DeepSpeed's ZeRO 1/2 optimizer (deepspeed/runtime/zero/stage_1_and_2.py,
# DeepSpeedZeroOptimizer.__init__) asserts `allgather_bucket_size % nccl_start_alignment_factor == 0`,
# with nccl_start_alignment_factor = 2 (4-byte alignment of fp16 all-gather buffers). It pads
# partitions to that factor times the world size itself, and reduce_bucket_size only has to be > 0
# (deepspeed/runtime/zero/config.py), so this is the one rule a bucket size must meet.
NCCL_START_ALIGNMENT_FACTOR = 2


def bucket_size(num_params: int) -> int:
    """The model's parameter count, clamped, rounded up to DeepSpeed's all-gather alignment."""
    size = int(min(MAX_BUCKET, max(MIN_BUCKET, num_params)))
    return -(-size // NCCL_START_ALIGNMENT_FACTOR) * NCCL_START_ALIGNMENT_FACTOR


def deepspeed_config(
    cfg: Config, engine: str, world_size: int, device_type: str = "cpu", num_params: int | None = None,
    micro_batch: int | None = None,
) -> dict:
    """The DeepSpeed config for engine 'vae' or 'disc'; `deepspeed.<engine>` keys are merged last.

    num_params (the engine's model size; the run plan always passes it) sizes ZeRO's communication
    buckets; without it DeepSpeed's defaults apply. micro_batch: the run plan's, split once; without it
    (tools, tests) it is split from world_size here.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if cfg.train.precision == "fp16" and device_type == "cpu":
        raise ConfigError(
            "train.precision=fp16 needs a GPU (its loss scaling is a CUDA path); this run is on CPU. "
            "Use train.precision=bf16 or fp32 on CPU."
        )
    ds = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(cfg, world_size) if micro_batch is None else micro_batch,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.train.grad_clip,
        "steps_per_print": 10**9,  # progress and metrics go through our logger, not DeepSpeed's prints
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        **_optimizer_and_schedule(getattr(cfg.optim, engine), device_type),
        # bf16 is autocast: fp32 weights and optimizer state, matmuls and convs in bf16. The GAN-style
        # objective keeps its losses in fp32 (autocast does that for the BCE terms), and the same path
        # runs on CPU, so it is tested here.
        "torch_autocast": {"enabled": cfg.train.precision == "bf16", "dtype": "bfloat16"},
        "fp16": {"enabled": cfg.train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
    }
    if cfg.train.zero_stage > 0 and num_params is not None:
        size = bucket_size(num_params)
        ds["zero_optimization"].update({"reduce_bucket_size": size, "allgather_bucket_size": size})
    merged = deep_merge(ds, getattr(cfg.deepspeed, engine))
    _check_allgather_bucket(merged, getattr(cfg.deepspeed, engine), engine)
    return merged


def _optimizer_and_schedule(opt, device_type: str) -> dict:
    return {
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": opt.lr,
                "betas": list(opt.betas),
                "eps": 1e-8,
                "weight_decay": opt.weight_decay,
                # torch's AdamW everywhere, fused into one kernel on GPU: DeepSpeed's own FusedAdam is
                # JIT-compiled at the first start (an nvcc matching torch's CUDA, and a build lock that
                # every rank of a node waits on, with no timeout).
                "torch_adam": True,
                **({"fused": True} if device_type == "cuda" else {}),
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
    }


def _check_allgather_bucket(merged: dict, given_section: dict, engine: str) -> None:
    given = given_section.get("zero_optimization", {}).get("allgather_bucket_size")
    if merged["zero_optimization"].get("stage", 0) in (1, 2) and given is not None and (
        not isinstance(given, (int, float)) or given <= 0 or int(given) != given
        or int(given) % NCCL_START_ALIGNMENT_FACTOR
    ):
        raise ConfigError(
            f"config key 'deepspeed.{engine}.zero_optimization.allgather_bucket_size' is {given!r}; ZeRO 1/2 need "
            f"a positive multiple of {NCCL_START_ALIGNMENT_FACTOR} (DeepSpeed's nccl_start_alignment_factor)"
        )


# Where each part of a derived DeepSpeed config comes from, to name the setting when DeepSpeed refuses.
_SOURCES = (
    (("train_batch_size", "train_micro_batch_size", "micro_batch"), "train.global_batch_size"),
    (("gradient_accumulation",), "train.grad_accum"),
    (("gradient_clipping",), "train.grad_clip"),
    (("zero", "stage", "bucket", "partition"), "train.zero_stage"),
    (("fp16", "bf16", "bfloat16", "autocast", "loss_scale", "half"), "train.precision"),
    (("scheduler", "warmup"), "optim.{engine}.warmup_steps"),
    (("optimizer", "lr", "betas", "weight_decay", "adam"), "optim.{engine}"),
)


def _leaf_paths(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        out.extend(_leaf_paths(value, path) if isinstance(value, dict) and value else [path])
    return out


def describe_refusal(cfg: Config, engine: str, exc: BaseException) -> str:
    """One line for DeepSpeed refusing an engine's config: its complaint and the settings behind it."""
    complaint = " ".join(str(exc).split()) or type(exc).__name__
    lower = complaint.lower()
    passthrough = [f"deepspeed.{engine}.{path}" for path in _leaf_paths(getattr(cfg.deepspeed, engine))
                   if path.rsplit(".", 1)[-1].lower() in lower]
    derived = [key.format(engine=engine) for words, key in _SOURCES if any(w in lower for w in words)]
    named = passthrough or list(dict.fromkeys(derived))  # a key the user wrote is the likelier culprit
    values = {"train.global_batch_size": cfg.train.global_batch_size, "train.grad_accum": cfg.train.grad_accum,
              "train.grad_clip": cfg.train.grad_clip, "train.zero_stage": cfg.train.zero_stage,
              "train.precision": cfg.train.precision}
    if named:
        settings = ", ".join(f"{k}={values[k]}" if k in values else k for k in named)
        hint = f"change {settings}"
    else:
        hint = (f"it is derived from train.zero_stage={cfg.train.zero_stage}, train.precision={cfg.train.precision}, "
                f"train.global_batch_size={cfg.train.global_batch_size}, optim.{engine} and deepspeed.{engine}")
    return f"DeepSpeed refused the {engine} engine's config ({type(exc).__name__}: {complaint[:400]}); {hint}"
