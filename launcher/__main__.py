"""`python -m launcher [--nproc N] [--max-restarts R] [--dry-run] -- COMMAND [ARGS...]`

Every launch path (laptop, torchrun, Slurm, Kubernetes) goes through here. It works out the
rank layout from the environment, sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
NODE_RANK, MASTER_ADDR and MASTER_PORT, and then either becomes the command (one process per
Slurm task / torchrun worker / single-GPU pod) or starts and supervises this node's ranks
(`--nproc N`, multi-GPU pods). See docs/launch.md.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

from disent.errors import ExitCode
from disent.host import available_cpus, free_port
from launcher.supervise import log, run_group
from launcher.topology import LaunchError, Topology, gpu_count, resolve

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launcher",
        description="Detect Slurm / Kubernetes Indexed Job / torchrun / local, set the torch.distributed "
        "variables and run COMMAND as every rank (e.g. `python -m launcher --nproc 2 -- disent train CONFIG`).",
    )
    parser.add_argument("--nproc", type=int, default=None,
                        help="ranks to start on this machine (local runs, multi-GPU pods); under Slurm or "
                        "torchrun the scheduler starts them, and a different value is refused")
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="local runs: restart the whole group up to R times when a rank fails with "
                        "anything but 2 (an input error) or 75 (preempted): 69, a crash or a signal death "
                        "(the trainer resumes from its latest checkpoint)")
    parser.add_argument("--grace", type=float, default=60.0,
                        help="seconds ranks get to stop after SIGTERM before SIGKILL (default 60)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved topology and each rank's variables as JSON; run nothing")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    return parser


def threads_per_rank(topology: Topology) -> int:
    """Each rank's share of this machine's cores (Slurm: --cpus-per-task)."""
    return topology.threads_per_rank or max(1, available_cpus() // topology.nproc_per_node)


def rank_environment(topology: Topology, base: dict[str, str], local_rank: int | None, port: int | None
                     ) -> dict[str, str]:
    env = dict(base)
    env.update(topology.rank_env(local_rank, port))
    cores = str(threads_per_rank(topology))
    for name in THREAD_VARS:
        env.setdefault(name, cores)
    env["DISENT_CPUS_PER_RANK"] = cores  # data.num_workers=auto sizes from it
    env["DISENT_LAUNCHER_MODE"] = topology.mode
    return env


def wait_for_name(host: str, port: int, timeout_s: float) -> None:
    """Kubernetes: pod 0's DNS record appears only once the headless Service lists it."""
    deadline = time.monotonic() + timeout_s
    announced = False
    while True:
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            return
        except socket.gaierror as exc:
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"MASTER_ADDR {host} did not resolve within {timeout_s:.0f}s ({exc}); does the headless "
                    f"Service exist, select the Job's pods and set publishNotReadyAddresses: true?"
                ) from None
            if not announced:
                log(f"waiting for {host} to resolve (pod 0 of the Job, through the headless Service)")
                announced = True
            time.sleep(1.0)


def warn_if_oversubscribed(topology, gpus: int) -> None:
    """CPU ranks beyond the cores share them, and every collective waits for the slowest."""
    if topology.spawn and not gpus and topology.nproc_per_node > available_cpus():
        print(f"launcher: warning: {topology.nproc_per_node} CPU ranks on {available_cpus()} usable core(s): ranks share "
              f"cores and every collective waits for the slowest; --nproc {available_cpus()} or fewer is faster",
              file=sys.stderr)


def foreign_package() -> str | None:
    """Why the `launcher` package Python imported is not this one (another distribution's __init__.py
    written over ours, or ours removed when that distribution was uninstalled), else None."""
    import launcher  # lazy: the package this process resolves now (another distribution's may shadow ours)

    if getattr(launcher, "DISTRIBUTION", None) == "disent-adversarial":
        return None
    where = getattr(launcher, "__file__", None) or ", ".join(getattr(launcher, "__path__", []))
    return (f"the `launcher` package at {where} is not disent's: another installed distribution provides a "
            "top-level `launcher` too; uninstall it, then reinstall disent-adversarial (docs/launch.md)")


def dry_run_report(topology: Topology) -> str:
    """--dry-run: the resolved topology and each rank's variables, as JSON."""
    port = topology.master_port or 0
    ranks = (
        [rank_environment(topology, {}, i, port) for i in range(topology.nproc_per_node)]
        if topology.spawn else [rank_environment(topology, {}, None, port)]
    )
    return json.dumps({"mode": topology.mode, "world_size": topology.world_size, "nnodes": topology.nnodes,
                       "node_rank": topology.node_rank, "nproc_per_node": topology.nproc_per_node,
                       "spawn": topology.spawn, "ranks": ranks}, indent=1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (foreign := foreign_package()) is not None:
        print(f"launcher: error: {foreign}", file=sys.stderr)
        return ExitCode.INPUT_ERROR
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("launcher: error: no command given; usage: python -m launcher [options] -- COMMAND [ARGS...]",
              file=sys.stderr)
        return ExitCode.INPUT_ERROR
    env = dict(os.environ)
    try:
        topology = resolve(env, nproc=args.nproc, max_restarts=args.max_restarts)
    except LaunchError as exc:
        print(f"launcher: error: {exc}", file=sys.stderr)
        return ExitCode.INPUT_ERROR
    gpus = gpu_count(env)
    warn_if_oversubscribed(topology, gpus)

    if args.dry_run:
        print(dry_run_report(topology))
        return 0

    if topology.mode == "kubernetes":
        try:
            wait_for_name(topology.master_addr, topology.master_port,
                          float(env.get("DISENT_RENDEZVOUS_TIMEOUT", "900")))
        except LaunchError as exc:
            # Pod 0 may still be pending (a full cluster): let the Job try again rather than fail it.
            print(f"launcher: error: {exc}", file=sys.stderr)
            return ExitCode.RETRYABLE

    single = not topology.spawn or (topology.nproc_per_node == 1 and args.max_restarts == 0)
    if single:
        port = topology.master_port if topology.master_port is not None else free_port(host="")
        rank_env = rank_environment(topology, env, 0 if topology.spawn else None, port)
        if topology.is_global_rank0_process:
            log(topology.describe(command, gpus, port, threads_per_rank(topology)))
        try:
            os.execvpe(command[0], command, rank_env)
        except OSError as exc:
            print(f"launcher: error: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
            return 127

    if topology.is_global_rank0_process:
        shown_port = topology.master_port if topology.master_port is not None else "<free port per attempt>"
        log(topology.describe(command, gpus, shown_port, threads_per_rank(topology)))
    return run_group(
        topology, command, lambda local_rank, port: rank_environment(topology, env, local_rank, port),
        max_restarts=args.max_restarts, grace_s=args.grace,
    )


if __name__ == "__main__":
    sys.exit(main())
