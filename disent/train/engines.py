"""The two DeepSpeed engines (VAE and discriminator).

Each engine gets its own optimizer, LR schedule and DeepSpeed config, all derived from the one
YAML config by `disent.train.ds_config.deepspeed_config`, once, in the run plan (train/plan.py).

The VAE engine wraps `VAEObjective`, whose forward computes the whole VAE loss: DeepSpeed hooks
its backward prologue (ZeRO's gradient-reduction bookkeeping, accumulation scaling) onto the
outputs of `engine(...)`, so the loss must come out of the engine's forward, not out of calls to
`engine.module.encode`. The discriminator is passed into that forward as its bare module
(`disc_engine.module`) with frozen parameters: calling the discriminator *engine* there would
register its backward hooks on the VAE's graph and DeepSpeed 0.19.8 then refuses the VAE's
backward ("Direct calls to tensor.backward() are not supported ...").
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import logging
import os
import platform
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.nn as nn

from disent.checkpoint import RunLayout
from disent.config import Config, ConfigError
from disent.models.discriminator import critics_from_config
from disent.models.objective import Fakes, Objective
from disent.models.vae import DisentVAE, vae_from_config
from disent.train.ds_config import describe_refusal

if TYPE_CHECKING:
    from disent.train.plan import RunPlan

log = logging.getLogger(__name__)


# glibc hands freed blocks above its adaptive mmap threshold back to the kernel and trims the heap
# top, so each step's large activations and gradients are page-faulted and zeroed anew, in kernel time
# every step (figures in docs/benchmarks.md, History).
# Fixed thresholds keep freed memory in the heap for the next step, as a caching allocator would.
MALLOC_MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for this setting on 64-bit
MALLOC_TRIM_THRESHOLD = 256 << 20
_ALLOCATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "GLIBC_TUNABLES",
                       "LD_PRELOAD")


def keep_freed_memory_for_reuse() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (its DataLoader workers inherit them).
    Returns whether they were set: not off glibc, and not where the environment already chooses the
    allocator or its settings (jemalloc/tcmalloc through LD_PRELOAD, MALLOC_*_, GLIBC_TUNABLES)."""
    if platform.libc_ver()[0] != "glibc" or any(os.environ.get(name) for name in _ALLOCATOR_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD) == 1 and mallopt(m_trim_threshold,
                                                                             MALLOC_TRIM_THRESHOLD) == 1


# --------------------------------------------------------------------------- modules


class VAEObjective(nn.Module):
    """The VAE plus its training objective; the VAE engine's module (`.vae` is the bare model, `.objective` the
    run's weights and terms)."""

    def __init__(self, vae: DisentVAE, objective: Objective):
        super().__init__()
        self.vae = vae
        self.objective = objective

    def forward(
        self,
        x1: torch.Tensor,
        x1p: torch.Tensor,
        x2: torch.Tensor,
        x2p: torch.Tensor,
        y2: torch.Tensor,
        *,
        discriminator: nn.Module,
        step: int,
        y1: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], Fakes]:
        return self.objective.vae_losses(self.vae, discriminator, x1, x1p, x2, x2p, y2, step, y1=y1)


def _bare_modules(cfg: Config) -> tuple[VAEObjective, nn.Module]:
    vae, disc = vae_from_config(cfg), critics_from_config(cfg)  # in this order: it decides the initial weights
    return VAEObjective(vae, Objective(cfg.loss, cfg.data.num_classes)), disc


def parameter_counts(cfg: Config) -> dict[str, int]:
    """Each engine's parameter count, from its modules built on the meta device (no memory, no initialization, no
    random numbers drawn): the run plan sizes ZeRO's buckets by it before the real modules exist."""
    with torch.device("meta"):
        vae_objective, disc = _bare_modules(cfg)
    return {"vae": _count(vae_objective), "disc": _count(disc)}


def build_modules(cfg: Config) -> tuple[VAEObjective, nn.Module]:
    vae_objective, disc = _bare_modules(cfg)
    vae = vae_objective.vae
    if cfg.train.compile:
        # One Inductor cache under run_dir (a shared file system on a cluster) instead of each node's /tmp: every
        # rank and every restart reuses the kernels compiled once. A user's own setting wins.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(RunLayout(cfg.run_dir).compile_cache))
        # In-place Module.compile keeps parameter names, so checkpoints and final weights load into
        # uncompiled models. The parts are compiled, not the objective: the VAE is called through
        # encode/decode, and the critics run frozen inside the VAE step and trainable in their own.
        for part in (vae.encoder, vae.decoder, *disc.children()):
            part.compile()
    return vae_objective, disc


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Parameters that do not collect gradients inside the block (restored afterwards)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


# --------------------------------------------------------------------------- engines


@dataclass
class Engines:
    vae: Any  # deepspeed.DeepSpeedEngine around VAEObjective
    disc: Any  # deepspeed.DeepSpeedEngine around the discriminator
    configs: dict[str, dict] = field(default_factory=dict)  # engine name -> DeepSpeed config used

    @property
    def vae_model(self) -> DisentVAE:
        return self.vae.module.vae

    @property
    def disc_model(self) -> nn.Module:
        return self.disc.module

    @property
    def objective(self) -> Objective:
        return self.vae.module.objective

    def lrs(self) -> dict[str, float]:
        return {"lr/vae": float(self.vae.get_lr()[0]), "lr/disc": float(self.disc.get_lr()[0])}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_engines(cfg: Config, plan: RunPlan) -> Engines:
    """Build both modules and call deepspeed.initialize once per engine, with the plan's DeepSpeed configs."""
    import deepspeed  # lazy: importing DeepSpeed picks its accelerator, which train.distributed decides first

    env = plan.env
    vae_objective, disc = build_modules(cfg)
    sizes = {"vae": _count(vae_objective), "disc": _count(disc)}
    if sizes != dict(plan.parameters):
        raise RuntimeError(f"the run plan sized the DeepSpeed configs for {dict(plan.parameters)} parameters, but the "
                           f"modules have {sizes}")
    if env.rank == 0:
        parts = ", ".join(f"{name} {_count(part):,}" for name, part in disc.named_children())
        log.info("model: VAE %s parameters (encoder %s, decoder %s), discriminator and critics %s (%s)",
                 f"{sizes['vae']:,}", f"{_count(vae_objective.vae.encoder):,}", f"{_count(vae_objective.vae.decoder):,}",
                 f"{sizes['disc']:,}", parts)
    configs = {name: copy.deepcopy(dict(plan.deepspeed[name])) for name in sizes}  # the plan's stay as planned
    # DeepSpeed would put each engine on cuda:LOCAL_RANK; `device_rank` makes it use this rank's GPU.
    args = SimpleNamespace(device_rank=env.device_index) if env.device_type == "cuda" else None
    engines = {}
    for name, module in (("vae", vae_objective), ("disc", disc)):
        try:
            engines[name], _, _, _ = deepspeed.initialize(
                args=args, model=module, model_parameters=module.parameters(), config=configs[name]
            )
        except (AssertionError, ValueError, TypeError, KeyError) as exc:  # pydantic's errors are ValueErrors
            # Only the config can make DeepSpeed's set-up refuse: the modules are ours, built the same
            # way for every setting. Naming the setting beats a traceback from inside DeepSpeed.
            raise ConfigError(describe_refusal(cfg, name, exc)) from None
    vae_engine, disc_engine = engines["vae"], engines["disc"]
    if cfg.train.channels_last:
        # After initialize: DeepSpeed broadcasts parameters as byte views, which need the default
        # layout. The conversion swaps each parameter's data in place, so the optimizers keep them.
        for engine in (vae_engine, disc_engine):
            engine.module.to(memory_format=torch.channels_last)
    if env.world_size == 1 and cfg.train.zero_stage == 0:
        # One rank: DeepSpeed would still flatten every gradient, all-reduce it with itself and copy
        # it back, every step. ZeRO 1/2 keep theirs: their optimizers consume the reduction.
        for engine in (vae_engine, disc_engine):
            engine.enable_backward_allreduce = False
    return Engines(vae=vae_engine, disc=disc_engine, configs=configs)


def stage0_grad_norm(engine) -> torch.Tensor | None:
    """ZeRO 0 in fp32 clips without keeping the norm; compute it (after the all-reduce) ourselves, as a tensor on
    the gradients' device (reading it on the host would wait for the GPU every step)."""
    if engine.zero_optimization_stage() != 0 or engine.fp16_enabled() or engine.bfloat16_enabled():
        return None
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
