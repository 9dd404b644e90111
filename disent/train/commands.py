"""`disent train CONFIG [overrides...] [--resume PATH]`.

Everything a user can get wrong (config, batch split over the world size, precision on CPU, the
data manifest, the checkpoint to resume) is checked before the process group starts, by the preflight,
which leaves the run plan (train/plan.py) the rest of the run reads. Ranks come from torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); without it the command trains
as a single process. Exit codes (disent.errors.ExitCode): 0 done, 2 input
error (never retried), 69 retryable failure (storage unreachable, a shard failing, a lost peer:
restart and it resumes), 75 preempted (SIGTERM/SIGUSR1: a checkpoint was written; requeue), 130 interrupted
(Ctrl-C: a checkpoint was written; run it again to resume).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from disent.config import Config, ConfigError, flatten, load_config, to_dict
from disent.errors import RetryableFailure
from disent.io.urls import redact_url_credentials
from disent.logs import setup_logging
from disent.models.loss_weights import TERMS

if TYPE_CHECKING:
    from disent.train.plan import RunPlan

log = logging.getLogger(__name__)


def register(subparsers, add_config_args) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train on the two DeepSpeed engines (run under torchrun for several ranks)",
        description="Train the VAE and the discriminator. Resumes from the latest complete checkpoint in "
        "run_dir unless --resume names one. Exit codes: 2 input error (never retry), 69 retryable failure "
        "(restart: it resumes), 75 preempted (SIGTERM/SIGUSR1) after checkpointing (requeue), 130 interrupted "
        "(Ctrl-C) after checkpointing.",
    )
    add_config_args(parser)
    parser.add_argument("--resume", metavar="PATH", help="a checkpoint directory (…/checkpoints/step-N) or a run dir")
    parser.add_argument("--no-auto-resume", action="store_true", help="start from scratch even if run_dir has checkpoints")
    parser.set_defaults(func=_cmd_train)


def preflight(cfg: Config, resume: str | None, auto_resume: bool = True, device_type: str | None = None) -> RunPlan:
    """All checks that need no process group; returns the run plan they leave (built here, once per run).
    Raises ConfigError."""
    from disent.checkpoint import CheckpointError, CheckpointManager, RunLayout
    from disent.train.plan import build_plan

    plan = build_plan(cfg, device_type)
    try:
        RunLayout(cfg.run_dir).check_writable(clean_up=plan.world_size == 1)
    except CheckpointError as exc:
        raise ConfigError(f"config key 'run_dir': {exc}") from None
    info = None
    if resume is not None:
        try:
            info = CheckpointManager.resolve(resume)
        except CheckpointError as exc:
            raise ConfigError(f"--resume {resume}: {exc}") from None
    elif auto_resume:
        info = CheckpointManager(cfg.run_dir).latest_complete()
    if info is not None:
        refuse_another_model(cfg, info.meta().get("config", {}), info.path, resume is None)
    return plan


def refuse_another_model(cfg: Config, saved: dict, path, automatic: bool) -> None:
    """A checkpoint of another model shape cannot be loaded (every rank would fail with a size mismatch deep in
    DeepSpeed, and a restart would fail the same way): one input error naming the keys, before any work. The shape is
    the model section, the data's image shape and classes, and the critics the loss terms build."""
    now, then = flatten(to_dict(cfg)), flatten(saved)
    keys = [k for k in now if k.startswith("model.") or k in ("data.image_size", "data.channels", "data.num_classes")]
    keys += [f"loss.{t.name}" for t in TERMS if t.critic]  # on or off decides whether its critic exists
    differ = [k for k in keys if k in then and (then[k] != now[k] if not k.startswith("loss.")
                                                else (then[k] > 0) != (now[k] > 0))]
    if differ:
        shown = ", ".join(f"{k}={then[k]} (the config: {now[k]})" for k in differ)
        how = "run_dir holds" if automatic else "--resume names"
        raise ConfigError(f"{how} a checkpoint of another model ({path}: {shown}); train in another run_dir, or set "
                          f"{' '.join(f'{k}={then[k]}' for k in differ)} to continue it")


def run_training(
    cfg: Config,
    plan: RunPlan,
    resume: str | None = None,
    auto_resume: bool = True,
    loader_factory=None,
    eval_hooks=None,
) -> int:
    """Join the process group, train, leave it. Returns the exit code (0, or 75 when preempted);
    raises RetryableFailure when a peer rank is lost."""
    from disent.train.distributed import init_distributed, shutdown_distributed
    from disent.train.engines import keep_freed_memory_for_reuse

    env = plan.env
    setup_logging(env.rank)
    if env.is_main:
        log.info("device: %s (train.device=%s; %d CUDA device(s) visible), %d rank(s), backend %s", env.device_type,
                 cfg.train.device, torch_cuda_count(), env.world_size, env.backend)
    keep_freed_memory_for_reuse()
    init_distributed(env, cfg.train.collective_timeout_s, cfg.eval.timeout_s)
    try:
        return train_in_group(cfg, plan, resume, auto_resume, loader_factory, eval_hooks)
    finally:
        shutdown_distributed()


def train_in_group(cfg: Config, plan: RunPlan, resume=None, auto_resume=True, loader_factory=None,
                   eval_hooks=None) -> int:
    """One training run inside an initialized process group. Returns the exit code.

    The process exits afterwards: SIGTERM/SIGUSR1 are caught from here on (a preemption while the
    engines are built or the checkpoint is loaded still ends in a checkpoint and 75), and ignored once
    the last checkpoint is complete (see Trainer.train(exiting=True)).
    """
    from disent.signals import PreemptionFlag
    from disent.train.distributed import is_lost_peer
    from disent.train.trainer import Trainer

    env = plan.env
    preemption = PreemptionFlag()
    preemption.install()
    try:
        trainer = Trainer(cfg, plan, loader_factory=loader_factory, eval_hooks=eval_hooks, preemption=preemption)
        result = trainer.train(resume=resume, auto_resume=auto_resume, exiting=True)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if cfg.train.compile and _is_compile_failure(exc):
            raise ConfigError(f"train.compile=true: torch.compile cannot build the model here ({type(exc).__name__}: "
                              f"{first_line[:300]}); set train.compile=false, or install what it names (a C++ "
                              "compiler for CPU, Triton for CUDA)") from None
        if is_lost_peer(exc):
            raise RetryableFailure(f"rank {env.rank} lost contact with a peer rank: {first_line}") from exc
        raise
    if env.is_main:
        if result.preempted:
            how = "interrupted" if result.interrupted else "preempted"
            print(f"disent: {how} at step {result.step}; checkpoint {result.checkpoint}; exit {int(result.exit_code)} "
                  f"({'run it again' if result.interrupted else 'requeue'} to resume)", file=sys.stderr)
        else:
            from disent.tracking import tracking_uri

            uri = redact_url_credentials(tracking_uri(cfg))
            print(f"disent: trained {result.step} steps; MLflow run {result.run_id}")
            hint = f"mlflow ui --backend-store-uri {uri}" if not uri.startswith("http") else f"open {uri}"
            print(f"disent: view it with: {hint}")
        for failure in result.eval_failures:
            print(f"disent: ERROR: the evaluation at {failure}", file=sys.stderr)
    return result.exit_code


def _is_compile_failure(exc: BaseException) -> bool:
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import InductorError

    return isinstance(exc, (BackendCompilerFailed, InductorError))


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    plan = preflight(cfg, args.resume, auto_resume=not args.no_auto_resume)
    return run_training(cfg, plan=plan, resume=args.resume, auto_resume=not args.no_auto_resume)


def torch_cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
