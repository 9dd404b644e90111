"""Checks across keys, after the typed build: ranges, combinations, secrets in URLs, and how the batch
splits over the ranks."""
from __future__ import annotations

from disent.config.schema import IMAGE_SIZES, Config, ConfigError
from disent.config.views import get_dotted
from disent.io.urls import URL_CREDENTIALS, redact_url_credentials


def _positive(cfg: Config, *dotted_keys: str) -> None:
    for dotted in dotted_keys:
        value = get_dotted(cfg, dotted)
        if value <= 0:
            raise ConfigError(f"config key '{dotted}' must be > 0, got {value!r}")


# URLs a config may hold; `scheme://user[:password]@host` in any of them is refused (a secret in a
# config would be written to run_dir/config.yaml, every checkpoint's meta.json and MLflow).
_URL_KEYS = ("data.url", "tracking.uri", "train.checkpoint_upload_url")


def validate(cfg: Config) -> None:
    """Checks across keys, once, when the config is loaded: the code that runs after may take the values as valid.
    The batch split over the ranks needs the world size; the run plan checks it (micro_batch_size)."""
    _positive(
        cfg,
        "data.image_size", "data.channels", "data.num_classes", "data.shuffle_buffer",
        "data.prefetch_factor", "model.z_dim", "model.base_channels",
        "model.disc_channels", "train.steps", "train.global_batch_size", "train.grad_accum",
        "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
        "train.stop_check_every", "train.collective_timeout_s", "train.checkpoint_upload_timeout_s", "eval.timeout_s", "optim.vae.lr", "optim.disc.lr",
    )
    if cfg.model.posterior_sigma < 0:
        raise ConfigError(f"config key 'model.posterior_sigma' must be >= 0 (0: a learned variance), "
                          f"got {cfg.model.posterior_sigma}")
    if cfg.model.prune_below_kl < 0:
        raise ConfigError(f"config key 'model.prune_below_kl' must be >= 0 nats (0: no pruning), "
                          f"got {cfg.model.prune_below_kl}")
    if cfg.data.image_size not in IMAGE_SIZES:
        raise ConfigError(f"config key 'data.image_size' must be 28, 32 or 64, got {cfg.data.image_size}")
    if cfg.data.channels not in (1, 3):
        raise ConfigError(f"config key 'data.channels' must be 1 or 3, got {cfg.data.channels}")
    if cfg.data.num_workers != "auto" and cfg.data.num_workers < 0:
        raise ConfigError(f"config key 'data.num_workers' must be >= 0 or auto, got {cfg.data.num_workers}")
    _streams(cfg)
    if cfg.model.base_channels % 8:
        raise ConfigError(
            f"config key 'model.base_channels' must be a multiple of 8 (GroupNorm uses 8 groups), "
            f"got {cfg.model.base_channels}"
        )
    _zero_stage_and_layout(cfg)
    _plain_vae_has_no_specified_terms(cfg)
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


def _streams(cfg: Config) -> None:
    rows = cfg.train.global_batch_size // cfg.train.grad_accum  # a loader step's pairs over all ranks
    if cfg.data.streams != "auto" and not 1 <= cfg.data.streams <= rows:
        raise ConfigError(f"config key 'data.streams' must be auto or 1..{rows} (the pairs per loader step over all "
                          f"ranks: train.global_batch_size / train.grad_accum), got {cfg.data.streams}")


def _plain_vae_has_no_specified_terms(cfg: Config) -> None:
    if cfg.model.s_dim < 0:
        raise ConfigError(f"config key 'model.s_dim' must be >= 0 (0: a plain VAE), got {cfg.model.s_dim}")
    if cfg.model.s_dim > 0:
        return
    # TERMS' on_s: every term beyond reconstruction and KL; a plain VAE (the reference for leakage figures) has none
    on = [(f"loss.{t.name}", getattr(cfg.loss, t.name), "0") for t in cfg.loss.on() if t.on_s]
    if cfg.model.class_channel:
        on.append(("model.class_channel", "true", "false"))
    if on:
        raise ConfigError(
            f"config key 'model.s_dim' is 0 (a plain VAE: reconstruction and KL only) but "
            f"{', '.join(f'{key}={value}' for key, value, _ in on)}; "
            f"set {' '.join(f'{key}={off}' for key, _, off in on)} for the reference VAE"
        )


def _zero_stage_and_layout(cfg: Config) -> None:
    if cfg.train.zero_stage not in (0, 1, 2):
        raise ConfigError(f"config key 'train.zero_stage' must be 0, 1 or 2, got {cfg.train.zero_stage}")
    if cfg.train.channels_last and cfg.train.zero_stage > 0:
        raise ConfigError(
            f"config key 'train.channels_last' needs train.zero_stage=0, got zero_stage {cfg.train.zero_stage}: "
            "ZeRO keeps parameters as views of one contiguous buffer, which channels_last would detach them from"
        )
    if cfg.train.channels_last and cfg.train.precision == "fp16":
        raise ConfigError(
            "config key 'train.channels_last' cannot be true with train.precision=fp16: DeepSpeed's fp16 optimizer "
            "keeps the weights as views of flat fp16 and fp32 buffers in the default layout, which the conversion "
            "would detach them from (fused AdamW refuses the mixed layouts); use precision=bf16 or "
            "train.channels_last=false"
        )


def micro_batch_size(cfg: Config, world_size: int) -> int:
    """Pairs per rank and micro-step; an input error when the global batch does not split evenly, or not into the
    train.batch_per_rank it was sized for."""
    wanted, total = cfg.train.batch_per_rank, cfg.train.global_batch_size
    if wanted is not None and total != wanted * world_size:
        raise ConfigError(
            f"train.global_batch_size={total} over {world_size} rank(s) is not the train.batch_per_rank={wanted} "
            f"pairs per rank it was sized for: set train.global_batch_size={wanted * world_size} for {world_size} "
            f"rank(s), or launch {total / wanted:g} ranks (under Kubernetes: completions, parallelism and "
            "DISENT_NNODES together)"
        )
    per_step = world_size * cfg.train.grad_accum
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by world size "
            f"({world_size}) x train.grad_accum ({cfg.train.grad_accum}) = {per_step}; "
            f"choose a multiple of {per_step}"
        )
    return cfg.train.global_batch_size // per_step
