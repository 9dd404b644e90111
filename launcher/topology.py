"""Where are we running, and which rank is this? Pure functions of an environment mapping.

`resolve(env, nproc=..., max_restarts=...)` returns a `Topology`: the node-level layout
(nodes, this node's index, ranks on this node, rendezvous address) and whether this process
*is* one rank (Slurm task, torchrun worker, an already-configured environment) or must *start*
the ranks of this node (local `--nproc N`, a Kubernetes pod with several GPUs).
Contradictory settings raise `LaunchError`; the CLI prints it and exits 2.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from launcher.errors import LaunchError
from launcher.hostlist import expand_nodelist, expand_tasks_per_node

# Variables the trainer (and torch.distributed / DeepSpeed) reads; the launcher owns them.

K8S_DEFAULT_PORT = 29500
SLURM_PORT_BASE = 12000  # job id -> 12000..31999: below Linux's ephemeral range (32768+)
SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class Topology:
    mode: str  # local | slurm | kubernetes | torchrun | env
    nnodes: int
    node_rank: int
    nproc_per_node: int  # ranks on this node
    world_size: int
    master_addr: str
    master_port: int | None  # None: local mode picks a free port for each attempt
    spawn: bool  # True: start nproc_per_node ranks here; False: this process is rank `rank`
    rank: int | None = None
    local_rank: int | None = None
    threads_per_rank: int | None = None
    note: str = ""

    def rank_env(self, local_rank: int | None = None, master_port: int | None = None) -> dict[str, str]:
        """The variables one rank gets."""
        if self.spawn:
            if local_rank is None:
                raise ValueError("spawning topologies need a local_rank")
            rank = self.node_rank * self.nproc_per_node + local_rank
        else:
            rank, local_rank = self.rank, self.local_rank
        port = master_port if master_port is not None else self.master_port
        if port is None:
            raise ValueError("no master port chosen")
        env = {
            "RANK": str(rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(self.nproc_per_node),
            "NODE_RANK": str(self.node_rank),
            "GROUP_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(port),
        }
        return env

    @property
    def is_global_rank0_process(self) -> bool:
        """The process that prints the topology line: rank 0 itself, or the launcher of node 0."""
        return self.node_rank == 0 if self.spawn else self.rank == 0

    def describe(self, command: list[str], gpus: int, port: int | str | None = None, threads: int | None = None) -> str:
        port = port if port is not None else self.master_port
        device = f"{gpus} GPU(s)/node, nccl" if gpus else "CPU, gloo"
        threads = threads or self.threads_per_rank
        threads = f" threads/rank={threads}" if threads else ""
        note = f" ({self.note})" if self.note else ""
        return (
            f"mode={self.mode}{note} world={self.world_size} nodes={self.nnodes} "
            f"ranks/node={self.nproc_per_node} master={self.master_addr}:{port} "
            f"device={device}{threads} cmd={' '.join(command)}"
        )


# --------------------------------------------------------------------------- Slurm parsing


def slurm_master_port(job_id: str) -> int:
    digits = re.sub(r"\D", "", job_id)  # array jobs: '123_4' -> 1234
    if not digits:
        raise LaunchError(f"SLURM_JOB_ID={job_id!r} is not a job id")
    return SLURM_PORT_BASE + int(digits) % SLURM_PORT_SPAN


# --------------------------------------------------------------------------- machine facts


def gpu_count(env: Mapping[str, str]) -> int:
    """NVIDIA GPUs this process may use, without importing torch (which costs seconds per rank)."""
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        present = len(list(proc.iterdir()))
    else:
        present = len([p for p in Path("/dev").glob("nvidia[0-9]*") if p.name[6:].isdigit()])
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return present
    ids = [v for v in visible.split(",") if v.strip() and v.strip() not in ("-1", "NoDevFiles")]
    return min(present, len(ids))


# --------------------------------------------------------------------------- resolution


def _int(env: Mapping[str, str], name: str, *, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None:
        raise LaunchError(f"{name} is not set")
    try:
        value = int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise LaunchError(f"{name}={value} must be >= {minimum}")
    return value


def _port(env: Mapping[str, str]) -> int | None:
    if "MASTER_PORT" not in env:
        return None
    port = _int(env, "MASTER_PORT", minimum=1)
    if port > 65535:
        raise LaunchError(f"MASTER_PORT={port} is not a TCP port (1-65535)")
    return port


def _agree(env: Mapping[str, str], name: str, expected: int | str, source: str) -> None:
    """An inherited RANK/WORLD_SIZE/... that disagrees with the scheduler is refused, not overwritten."""
    if name in env and str(env[name]) != str(expected):
        raise LaunchError(
            f"{name}={env[name]} contradicts {source} ({expected}); unset {name} and let the launcher "
            f"set it (it may have been exported from the shell that submitted the job)"
        )


def _check_nproc(nproc: int | None, per_node: int, where: str) -> None:
    if nproc is not None and nproc != per_node:
        raise LaunchError(
            f"--nproc {nproc} contradicts {where}, which runs {per_node} rank(s) on this node; "
            f"the scheduler starts the ranks here, so drop --nproc (or make it {per_node})"
        )


def _no_restarts(max_restarts: int, mode: str, how: str) -> None:
    if max_restarts:
        raise LaunchError(
            f"--max-restarts restarts a local group only; under {mode} restarts are done by {how}"
        )


def resolve(env: Mapping[str, str], nproc: int | None = None, max_restarts: int = 0) -> Topology:
    if nproc is not None and nproc < 1:
        raise LaunchError(f"--nproc must be >= 1, got {nproc}")
    if max_restarts < 0:
        raise LaunchError(f"--max-restarts must be >= 0, got {max_restarts}")

    in_slurm_step = "SLURM_PROCID" in env and "SLURM_STEP_ID" in env
    in_slurm_job = "SLURM_JOB_ID" in env
    in_k8s = "JOB_COMPLETION_INDEX" in env
    in_torchrun = "TORCHELASTIC_RUN_ID" in env

    if in_torchrun:  # torchrun's agent has set everything; it may itself run under Slurm or in a pod
        return _torchrun(env, nproc, max_restarts)
    if in_slurm_job and in_k8s:
        raise LaunchError(
            "both Slurm (SLURM_JOB_ID) and Kubernetes (JOB_COMPLETION_INDEX) variables are set; "
            "a process runs under one scheduler: unset the ones that leaked in"
        )
    if in_slurm_step:
        return _slurm(env, nproc, max_restarts)
    if in_k8s:
        return _kubernetes(env, nproc, max_restarts)
    if in_slurm_job:  # the batch script itself, outside srun
        ntasks = int(env.get("SLURM_NTASKS", "1") or 1)
        if nproc is None and ntasks > 1:
            raise LaunchError(
                f"this is the batch script of Slurm job {env['SLURM_JOB_ID']} with {ntasks} tasks, but not "
                f"a job step: start the ranks with `srun python -m launcher -- ...` (one per task), "
                f"or pass --nproc N to start N ranks on this node"
            )
    if any(name in env for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return _preset(env, nproc, max_restarts)
    return _local(env, nproc or 1, in_slurm_job)


def _torchrun(env: Mapping[str, str], nproc: int | None, max_restarts: int) -> Topology:
    missing = [n for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if n not in env]
    if missing:
        raise LaunchError(f"TORCHELASTIC_RUN_ID is set (torchrun) but {', '.join(missing)} is not")
    _no_restarts(max_restarts, "torchrun", "torchrun --max-restarts")
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE", minimum=1)
    local_rank = _int(env, "LOCAL_RANK")
    per_node = _int(env, "LOCAL_WORLD_SIZE", minimum=1) if "LOCAL_WORLD_SIZE" in env else 1
    if rank >= world:
        raise LaunchError(f"RANK={rank} must be < WORLD_SIZE={world}")
    _check_nproc(nproc, per_node, "torchrun --nproc-per-node")
    node_rank = int(env.get("GROUP_RANK", env.get("NODE_RANK", rank // per_node)))
    return Topology(
        mode="torchrun", nnodes=max(1, world // per_node), node_rank=node_rank, nproc_per_node=per_node,
        world_size=world, master_addr=env["MASTER_ADDR"], master_port=_port(env), spawn=False,
        rank=rank, local_rank=local_rank,
    )


def _slurm(env: Mapping[str, str], nproc: int | None, max_restarts: int) -> Topology:
    _no_restarts(max_restarts, "Slurm", "requeue (sbatch --requeue; slurm/train.sh requeues on exit code 75)")
    rank = _int(env, "SLURM_PROCID")
    world_name = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    world = _int(env, world_name, minimum=1)
    local_rank = _int(env, "SLURM_LOCALID")
    node_rank = _int(env, "SLURM_NODEID")
    if rank >= world:
        raise LaunchError(f"SLURM_PROCID={rank} must be < {world_name}={world}")
    nodes_name = "SLURM_STEP_NUM_NODES" if "SLURM_STEP_NUM_NODES" in env else "SLURM_NNODES"
    nnodes = _int(env, nodes_name, minimum=1) if nodes_name in env else 1
    if node_rank >= nnodes:
        raise LaunchError(f"SLURM_NODEID={node_rank} must be < {nodes_name}={nnodes}")
    tpn_name = next((n for n in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if n in env), None)
    if tpn_name:
        counts = expand_tasks_per_node(env[tpn_name])
        per_node = counts[node_rank] if node_rank < len(counts) else counts[-1]
    else:
        per_node = max(1, world // nnodes)
    if local_rank >= per_node:
        raise LaunchError(f"SLURM_LOCALID={local_rank} must be < the {per_node} task(s) on this node")
    _check_nproc(nproc, per_node, "this Slurm step")

    list_name = next((n for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if n in env), None)
    if list_name is None:
        raise LaunchError("in a Slurm step but SLURM_JOB_NODELIST is not set")
    master_addr = expand_nodelist(env[list_name])[0]
    port = _port(env)
    if port is None:
        port = slurm_master_port(env.get("SLURM_JOB_ID", ""))
    for name, value, source in (
        ("RANK", rank, "SLURM_PROCID"), ("WORLD_SIZE", world, world_name),
        ("LOCAL_RANK", local_rank, "SLURM_LOCALID"), ("MASTER_ADDR", master_addr, f"the first host of {list_name}"),
    ):
        _agree(env, name, value, source)
    threads = _int(env, "SLURM_CPUS_PER_TASK", minimum=1) if "SLURM_CPUS_PER_TASK" in env else None
    return Topology(
        mode="slurm", nnodes=nnodes, node_rank=node_rank, nproc_per_node=per_node, world_size=world,
        master_addr=master_addr, master_port=port, spawn=False, rank=rank, local_rank=local_rank,
        threads_per_rank=threads, note=f"job {env.get('SLURM_JOB_ID', '?')}",
    )


def _kubernetes(env: Mapping[str, str], nproc: int | None, max_restarts: int) -> Topology:
    _no_restarts(max_restarts, "Kubernetes", "the Job (backoffLimit, podFailurePolicy)")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        if name in env:
            raise LaunchError(
                f"{name} is set, but in a Kubernetes Indexed Job the launcher derives it from "
                f"JOB_COMPLETION_INDEX; remove {name} from the pod's environment"
            )
    index = _int(env, "JOB_COMPLETION_INDEX")
    if "DISENT_NNODES" not in env:
        raise LaunchError("in a Kubernetes Indexed Job but DISENT_NNODES (the Job's completions) is not set")
    nnodes = _int(env, "DISENT_NNODES", minimum=1)
    if index >= nnodes:
        raise LaunchError(f"JOB_COMPLETION_INDEX={index} must be < DISENT_NNODES={nnodes}")
    service = env.get("DISENT_SERVICE")
    if not service:
        raise LaunchError("in a Kubernetes Indexed Job but DISENT_SERVICE (the headless Service's name) is not set")
    job = env.get("DISENT_JOB_NAME")
    hostname = env.get("HOSTNAME", "")
    if not job:
        suffix = f"-{index}"
        if not hostname.endswith(suffix):
            raise LaunchError(
                f"cannot tell the Job's name: DISENT_JOB_NAME is not set and HOSTNAME={hostname!r} is not "
                f"'<job>{suffix}' as Kubernetes names Indexed Job pods"
            )
        job = hostname[: -len(suffix)]
    elif hostname and hostname != f"{job}-{index}":
        raise LaunchError(
            f"HOSTNAME={hostname!r} is not '{job}-{index}': is DISENT_JOB_NAME={job!r} this pod's Job?"
        )
    per_node_env = _int(env, "DISENT_NPROC_PER_NODE", minimum=1) if "DISENT_NPROC_PER_NODE" in env else None
    if nproc is not None and per_node_env is not None and nproc != per_node_env:
        raise LaunchError(f"--nproc {nproc} contradicts DISENT_NPROC_PER_NODE={per_node_env}")
    per_node = nproc or per_node_env or gpu_count(env) or 1
    master_addr = f"{job}-0.{service}"
    _agree(env, "MASTER_ADDR", master_addr, "'<job>-0.<service>' of this Indexed Job")
    port = _port(env) or K8S_DEFAULT_PORT
    return Topology(
        mode="kubernetes", nnodes=nnodes, node_rank=index, nproc_per_node=per_node,
        world_size=nnodes * per_node, master_addr=master_addr, master_port=port,
        spawn=per_node > 1, rank=None if per_node > 1 else index, local_rank=None if per_node > 1 else 0,
        note=f"job {job}",
    )


def _preset(env: Mapping[str, str], nproc: int | None, max_restarts: int) -> Topology:
    if "RANK" not in env or "WORLD_SIZE" not in env:
        have = [n for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if n in env]
        lacking = [n for n in ("RANK", "WORLD_SIZE") if n not in env]
        raise LaunchError(
            f"{', '.join(have)} is set but {', '.join(lacking)} is not: set RANK, WORLD_SIZE, MASTER_ADDR and "
            f"MASTER_PORT together (or none, and use --nproc)"
        )
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE", minimum=1)
    if rank >= world:
        raise LaunchError(f"RANK={rank} must be < WORLD_SIZE={world}")
    missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if n not in env]
    if missing and world > 1:
        raise LaunchError(f"RANK and WORLD_SIZE are set but {', '.join(missing)} is not")
    per_node = _int(env, "LOCAL_WORLD_SIZE", minimum=1) if "LOCAL_WORLD_SIZE" in env else 1
    if nproc is not None and nproc > 1:
        raise LaunchError(
            f"--nproc {nproc} would start ranks, but RANK={rank}/WORLD_SIZE={world} say this process is one "
            f"rank already; unset RANK and WORLD_SIZE, or drop --nproc"
        )
    _no_restarts(max_restarts, "an environment with RANK set", "whatever started this process")
    local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
    return Topology(
        mode="env", nnodes=max(1, world // per_node), node_rank=rank // per_node, nproc_per_node=per_node,
        world_size=world, master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_port(env) or 29500, spawn=False, rank=rank, local_rank=local_rank,
    )


def _local(env: Mapping[str, str], nproc: int, in_slurm_job: bool) -> Topology:
    return Topology(
        mode="local", nnodes=1, node_rank=0, nproc_per_node=nproc, world_size=nproc,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=_port(env), spawn=True,
        note=f"inside Slurm job {env['SLURM_JOB_ID']}" if in_slurm_job else "",
    )
