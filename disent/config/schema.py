"""The config schema: every key a user can set, its type and its default (configs/base.yaml lists them
all; a test keeps the two the same)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from disent.errors import InputError
from disent.models.loss_weights import LossWeights


# The square image sides the model is built for (disent/models/vae.py's DOWNSAMPLINGS).
IMAGE_SIZES = (28, 32, 64)


class ConfigError(InputError):
    """A config problem a user must fix; the CLI prints it without a traceback and exits 2."""


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
    # LORD-style class channel (extension): while training the decoder gets a learned code per class in place
    # of s, and s is pulled toward it; needs the labels
    class_channel: bool = False
    # 0: the paper's posterior, a learned variance per unit. > 0: a fixed-variance posterior z = mu + sigma * eps for
    # every unit (LORD), under which the KL term is an L2 penalty on mu: z has a fixed capacity the decoder spends on
    # what s does not give it, and no unit can go quiet with a learned variance while its mean keeps the class
    posterior_sigma: float = 0.0
    # the paper's f_z(x, s): the unspecified code's head also sees s. False: f_z(x), the trunk's features alone, so
    # the class has no direct path from s into the mean of z
    z_sees_s: bool = True
    # 0: off. > 0: at the last step, the units of z whose KL to the prior (averaged over the train stream, nats) is
    # below this are pruned: their mean is 0 and their variance 1 from then on (disent/train/pruning.py). The
    # decoder barely uses such a unit, but its mean can keep small class-dependent offsets a probe reads
    prune_below_kl: float = 0.0


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
    # pairs per rank and step (its micro batch x grad_accum) the config was sized for; None: global_batch_size / ranks.
    # When set, a launch on another number of ranks is refused instead of silently changing each rank's batch
    batch_per_rank: int | None = None
    grad_accum: int = 1
    zero_stage: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_clip: float = 1.0
    log_every: int = 20
    eval_every: int = 500
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    checkpoint_upload_url: str | None = None  # s3://bucket/prefix to copy completed checkpoints to
    # on a stop (SIGTERM/SIGUSR1) every rank waits at most this long for the stop checkpoint's upload, then all exit
    # 75 together: Slurm's SIGUSR1 comes 120 s before its limit (slurm/train.sh), Kubernetes gives 300 s
    checkpoint_upload_timeout_s: int = 60
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
    experiment: str | None = None  # None: $MLFLOW_EXPERIMENT_NAME, else "disent"
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
    at_end: bool = True  # evaluate at the last step (false: a smoke test or a benchmark skips it)


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
