"""Start the ranks of one node and watch them.

One rank failing takes the others down (SIGTERM, then SIGKILL after a grace period), so a
dead rank never leaves its peers hanging in a collective. A failed group is restarted up to
`max_restarts` times with a fresh rendezvous port; the program resumes from its checkpoints.
Exit codes (disent.errors.ExitCode), the policy slurm/train.sh and k8s/job.yaml follow too (the
table is in docs/faults.md): 75 (preempted, requeue me) is propagated and never restarted here,
since the scheduler that preempted us decides when to run again; 2 (input error) is never
restarted, since a restart fails the same way; anything else, 69 (a retryable failure), a crash
and a signal death (reported as 128 + N: 134 SIGABRT, 137 SIGKILL, 143 SIGTERM) alike, is restarted
while restarts remain, and then the group exits with it. The code of the first rank to fail decides,
not the codes its peers end with once they are stopped.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from typing import Callable

from disent.errors import ExitCode
from disent.host import free_port
from launcher.topology import Topology

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
POLL_S = 0.1


def log(message: str) -> None:
    print(f"launcher: {message}", file=sys.stderr, flush=True)


def exit_code(returncode: int) -> int:
    """Popen's -N (killed by signal N) as a shell would report it."""
    return 128 - returncode if returncode < 0 else returncode


def _die_with_parent() -> None:
    """Runs in the child before exec: if the launcher is SIGKILLed, its ranks go too (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Group:
    """One attempt: nproc ranks, each in its own session so a final SIGKILL reaches its workers too."""

    def __init__(self, command: list[str], envs: list[dict[str, str]]):
        self.procs: list[subprocess.Popen] = []
        for env in envs:
            self.procs.append(
                subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_die_with_parent)
            )
        self.codes: dict[int, int] = {}

    def poll(self) -> list[tuple[int, int]]:
        """(local_rank, exit code) of ranks that exited since the last call."""
        new = []
        for i, p in enumerate(self.procs):
            if i not in self.codes and p.poll() is not None:
                self.codes[i] = exit_code(p.returncode)
                new.append((i, self.codes[i]))
        return new

    @property
    def running(self) -> list[int]:
        return [i for i in range(len(self.procs)) if i not in self.codes]

    def signal(self, sig: int) -> None:
        """To the rank itself only: its data-loader workers must not see the trainer's SIGTERM."""
        for i in self.running:
            try:
                self.procs[i].send_signal(sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        for i, p in enumerate(self.procs):
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the rank and anything it started
            except (ProcessLookupError, PermissionError):
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.poll()


def run_group(
    topology: Topology,
    command: list[str],
    make_env: Callable[[int, int], dict[str, str]],
    *,
    max_restarts: int = 0,
    grace_s: float = 30.0,
) -> int:
    """Run the node's ranks until they finish; returns the code the launcher should exit with."""
    received: list[int] = []
    group: Group | None = None

    def on_signal(sig: int, _frame) -> None:
        received.append(sig)
        if group is not None:
            if sig == signal.SIGINT and received.count(signal.SIGINT) > 1:
                log("second interrupt: killing all ranks")
                group.kill()
            else:
                group.signal(sig)

    previous = {sig: signal.signal(sig, on_signal) for sig in FORWARDED}
    attempt = 0
    try:
        while True:
            port = topology.master_port if topology.master_port is not None else free_port(host="")
            envs = [make_env(local_rank, port) for local_rank in range(topology.nproc_per_node)]
            if attempt:
                log(f"restart {attempt}/{max_restarts}: starting {topology.nproc_per_node} rank(s) on port {port}")
            group = Group(command, envs)
            first_failure = _watch(group, grace_s, received)
            if first_failure is None:
                return 0
            rank, code = first_failure
            if received or code == ExitCode.PREEMPTED:
                return _stopped(group, received, rank, code)
            global_rank = topology.node_rank * topology.nproc_per_node + rank
            if code == ExitCode.INPUT_ERROR:  # a config or input error: restarting cannot fix it
                log(f"rank {global_rank} exited with code {int(ExitCode.INPUT_ERROR)}: its input was refused; "
                    "not restarting")
                return ExitCode.INPUT_ERROR
            if attempt < max_restarts:
                attempt += 1
                kind = " (a retryable failure)" if code == ExitCode.RETRYABLE else ""
                log(f"rank {global_rank} exited with code {code}{kind}; stopping the group and restarting "
                    f"({attempt}/{max_restarts}); the program resumes from its latest checkpoint")
                continue
            suffix = f" after {max_restarts} restart(s)" if max_restarts else ""
            log(f"rank {global_rank} exited with code {code}; the group was stopped{suffix}")
            return code
    finally:
        if group is not None and group.running:
            group.kill()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stopped(group: Group, received: list[int], rank: int, code: int) -> int:
    """A signal or a preempted rank ended the group: 75 (requeue) when every rank stopped cleanly by itself; else
    the first code that was not a clean stop (a rank killed after the grace period gives 137), which is retried."""
    why = f"signal {signal.Signals(received[0]).name}" if received else f"rank {rank} exited {code}"
    codes = sorted(set(group.codes.values()))
    unclean = [c for c in group.codes.values() if c not in (0, ExitCode.PREEMPTED)]
    if not unclean:
        log(f"preempted ({why}): ranks stopped with {codes}; exit {int(ExitCode.PREEMPTED)} so the job is requeued")
        return ExitCode.PREEMPTED
    log(f"stopped by {why}; ranks exited with {codes}; exit {unclean[0]}")
    return unclean[0]


def _watch(group: Group, grace_s: float, received: list[int]) -> tuple[int, int] | None:
    """Wait for all ranks. Returns the first non-zero (local_rank, code), or None if all exited 0 by themselves (a
    rank killed after the grace period counts as failed: it never finished)."""
    first_failure: tuple[int, int] | None = None
    deadline: float | None = None
    while group.running:
        for rank, code in group.poll():
            if code != 0 and first_failure is None:
                first_failure = (rank, code)
                if group.running:
                    if code != ExitCode.PREEMPTED and not received:
                        # A crash: tell the others to stop now. (On 75 they are stopping already.)
                        log(f"local rank {rank} exited with code {code}; terminating the other rank(s)")
                        group.signal(signal.SIGTERM)
                    deadline = time.monotonic() + grace_s
        if received and deadline is None:
            deadline = time.monotonic() + grace_s
        if deadline is not None and time.monotonic() > deadline and group.running:
            log(f"rank(s) {group.running} still running {grace_s:.0f}s later; killing them")
            killed = group.running
            group.kill()
            if first_failure is None:
                first_failure = (killed[0], group.codes.get(killed[0], 128 + signal.SIGKILL))
            break
        time.sleep(POLL_S)
    return first_failure
