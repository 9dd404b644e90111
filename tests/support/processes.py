"""Waiting on what a test started, and finding its training processes.

    wait_for(predicate, timeout, what, proc, log)   ->  predicate's first true value, or a failure that
                                                        says what did not happen and shows the output
    rank_pids(run_dir)                              ->  {RANK: [pid]} of the run's training processes
    stop(proc)                                      ->  proc's session killed, if it still runs
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable


def wait_for(predicate: Callable, timeout: float, what: str, proc: subprocess.Popen | None = None,
             log: Path | None = None, *, poll: float = 0.1, ended: Callable[[], str | None] | None = None,
             describe: Callable[[], str] | None = None):
    """Poll `predicate` every `poll` s and return its first true value. Fail (AssertionError) as soon as the
    job ends first, or after `timeout` seconds: "the job ended (rc N) before WHAT" / "no WHAT within Ts".

    The job is `proc` (ended when it exits) or `ended()` (returns why it is over, else None). The failure
    shows `describe()`, or else the last 4000 characters of the file `log`."""
    def details() -> str:
        if describe is not None:
            return describe()
        return log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        reason = ended() if ended is not None else None
        if reason is None and proc is not None and proc.poll() is not None:
            reason = f"the job ended (rc {proc.returncode})"
        if reason:
            raise AssertionError(f"{reason} before {what}:\n{details()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:.0f}s:\n{details()}")
        time.sleep(poll)


def rank_pids(run_dir: Path) -> dict[int, list[int]]:
    """{RANK: pids} of the training processes of this run_dir: a process whose command line has the argument
    `run_dir=RUN_DIR` and whose environment sets RANK, without its forked DataLoader workers (same command
    line, same environment, their parent is the rank). One pid a rank while the run is healthy."""
    needle = f"run_dir={run_dir}".encode()
    found: dict[int, tuple[int, int]] = {}  # pid -> (rank, parent pid)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if needle not in Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0"):
                continue
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            rank = next((int(item[len(b"RANK="):]) for item in env if item.startswith(b"RANK=")), None)
        except (OSError, ValueError, IndexError):
            continue
        if rank is not None:
            found[int(entry)] = (rank, ppid)
    ranks: dict[int, list[int]] = {}
    for pid, (rank, ppid) in sorted(found.items()):
        if ppid not in found:
            ranks.setdefault(rank, []).append(pid)
    return ranks


def stop(proc: subprocess.Popen) -> None:
    """Kill a process the test started in a session of its own (start_new_session=True), and everything it
    started, if it is still running."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
