"""Where a rank runs and how the ranks talk: the device decision, the process group, a CPU control
group for small agreements, and determinism.

One decision picks the device (`train.device`, `choose_device`) and DeepSpeed is told the same
(`DS_ACCELERATOR`), so the module and the batches can never end up on different devices.

The process group is created here, not by DeepSpeed: DeepSpeed 0.19 passes
`device_id=cuda:LOCAL_RANK` to `init_process_group`, which is wrong for a task that sees only its own
GPU (Slurm's `--gpus-per-task=1`, `--gpu-bind=single:1`): there LOCAL_RANK may be 3 while the only
visible device is cuda:0. Created first, the group is adopted by `deepspeed.init_distributed` as is.

The control group is a gloo group beside the training group. The ranks use it to agree on a stop
signal, to take rank 0's choice of checkpoint and to wait for rank 0's evaluation: on CPU tensors, so
none of it waits for the GPU's queue, and with its own timeout, so a long evaluation is not a stalled
NCCL collective.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from packaging.version import Version

from disent import process_group
from disent.config import ConfigError
from disent.host import free_port

log = logging.getLogger(__name__)

# CleanUpOnly: on a timeout or a peer's failure NCCL's communicators are aborted and the collective
# raises in Python (a DistBackendError, exit 69). Torch's default (3) and 1 end the process with SIGABRT.
NCCL_ERROR_HANDLING = ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: read from torchrun's environment, single process by default."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device_type: str = "cpu"

    @property
    def backend(self) -> str:
        return "nccl" if self.device_type == "cuda" else "gloo"

    @property
    def device_index(self) -> int:
        """The GPU of this rank: LOCAL_RANK modulo the GPUs this process sees (a task that sees only
        its own GPU, e.g. Slurm's per-task binding, has LOCAL_RANK > 0 but one device: index 0)."""
        count = torch.cuda.device_count() if self.device_type == "cuda" else 0
        return self.local_rank % count if count else 0

    @property
    def device(self) -> torch.device:
        if self.device_type == "cuda":
            return torch.device("cuda", self.device_index)
        return torch.device(self.device_type)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer") from None


def choose_device(requested: str) -> str:
    """`train.device` -> "cuda" or "cpu". auto is cuda when torch sees a GPU; cuda without one is an input error."""
    available = torch.cuda.is_available()
    if requested == "auto":
        return "cuda" if available else "cpu"
    if requested == "cuda" and not available:
        raise ConfigError(f"train.device=cuda, but torch {torch.__version__} sees no CUDA device (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use train.device=cpu or auto")
    return requested


def use_accelerator(device_type: str) -> None:
    """Tell DeepSpeed the device chosen: DS_ACCELERATOR before it first picks one; refuse a different one
    picked earlier in this process (DeepSpeed keeps its first choice)."""
    if os.environ.get("DS_ACCELERATOR") not in (None, device_type):
        log.info("DS_ACCELERATOR=%s replaced by %s (train.device decides)", os.environ["DS_ACCELERATOR"], device_type)
    os.environ["DS_ACCELERATOR"] = device_type
    from deepspeed.accelerator import real_accelerator  # lazy: DeepSpeed's first import reads DS_ACCELERATOR

    chosen = real_accelerator.ds_accelerator
    if chosen is not None and chosen.device_name() != device_type:
        raise ConfigError(f"DeepSpeed already runs on {chosen.device_name()} in this process, but train.device chose "
                          f"{device_type}; start a new process (or set train.device={chosen.device_name()})")


def detect_env(device_type: str = "cpu") -> DistEnv:
    """RANK / WORLD_SIZE / LOCAL_RANK from the environment, on the device `choose_device` picked; read once per run,
    by the run plan (train/plan.py). A value that is no integer is an input error."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device_type=device_type)


def _device_id_safe() -> bool:
    """torch 2.6.x-2.7.0 can hang with device_id (pytorch#153960); DeepSpeed skips it there too."""
    return not Version("2.6.0") < Version(torch.__version__.split("+")[0]) < Version("2.7.1")


def init_distributed(env: DistEnv, timeout_s: float = 600, wait_timeout_s: float = 3600) -> None:
    """Join the process group (gloo on CPU, nccl on GPU, bound to this rank's own device) with the collective
    timeout; a lone process gets a local one. Then the control groups (make_control_groups)."""
    use_accelerator(env.device_type)
    import deepspeed  # lazy: only now, with DS_ACCELERATOR set (use_accelerator)

    if process_group.active():
        return
    if env.world_size == 1:
        for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())), ("RANK", "0"),
                            ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            os.environ.setdefault(name, value)
    kwargs: dict[str, Any] = {"timeout": timedelta(seconds=timeout_s)}
    if env.device_type == "cuda":
        os.environ.setdefault(*NCCL_ERROR_HANDLING)
        torch.cuda.set_device(env.device_index)
        if env.world_size > 1 and _device_id_safe():
            kwargs["device_id"] = env.device
    else:
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op that only
        # inference_all_reduce uses. The build costs minutes on a fresh machine, and a rank
        # killed while loading it leaves a file lock that makes every later run wait forever.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    dist.init_process_group(env.backend, **kwargs)
    deepspeed.init_distributed(dist_backend=env.backend, auto_mpi_discovery=False, timeout=kwargs["timeout"])
    make_control_groups(env.backend, timeout_s, wait_timeout_s)


def make_control_groups(backend: str, timeout_s: float, wait_timeout_s: float) -> None:
    """The gloo control group for agreements (the collective timeout; the world group itself when it is gloo), and
    the gloo group the ranks wait for rank 0's evaluation on, whose timeout is the evaluation's: in gloo every rank
    but 0 waits in monitored_barrier with its group's timeout, not the barrier's, so a wait on the control group
    would give up at the collective timeout however long the evaluation may take."""
    _CONTROL.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if backend != "gloo" else None
    _CONTROL.waiting = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait_timeout_s))


_PEER_LOSS_MARKERS = ("connection closed by peer", "connection reset by peer", "gloo", "nccl", "broken pipe",
                      "timed out")


def is_lost_peer(exc: BaseException) -> bool:
    """A collective that failed because a peer rank died or became unreachable: torch's DistError
    family (NCCL, the store), or gloo's plain RuntimeError ("Connection closed by peer")."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _PEER_LOSS_MARKERS)


def shutdown_distributed() -> None:
    _CONTROL.group = _CONTROL.waiting = None
    if process_group.active():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# --------------------------------------------------------------------------- the control group


# process_group owns the groups, so that its from_rank_zero (the one for every layer) broadcasts on them.
_CONTROL = process_group.CONTROL


def _world() -> int:
    return process_group.rank_and_world()[1]


def agree_any(flag: bool) -> bool:
    """Whether any rank's flag is set (a collective on CPU: no device sync)."""
    if _world() == 1:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_CONTROL.group)
    return bool(value[0])


def wait_for_rank_zero(timeout_s: float) -> None:
    """Every rank waits here until rank 0 arrives (after its evaluation), at most timeout_s (the waiting group's
    own timeout, make_control_groups); a CPU barrier, so no NCCL collective is pending while rank 0 works."""
    if _world() == 1:
        return
    group = _CONTROL.waiting if _CONTROL.waiting is not None else _CONTROL.group
    if group is None and dist.get_backend() != "gloo":
        dist.barrier()
        return
    dist.monitored_barrier(group=group, timeout=timedelta(seconds=timeout_s))


# --------------------------------------------------------------------------- determinism


def apply_determinism(setting: bool | str, device_type: str) -> bool:
    """`train.deterministic`: auto is on for cpu (a resume is bit-exact, which the tests check) and off for cuda,
    where deterministic kernels cost speed and cuDNN may autotune. Returns whether it is on."""
    on = device_type == "cpu" if setting == "auto" else bool(setting)
    if on and device_type == "cuda":
        # cuBLAS needs a fixed workspace to be deterministic; it must be set before its first handle.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on and device_type == "cuda"
    return on
