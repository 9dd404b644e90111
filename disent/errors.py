"""The two kinds of failure, and the process exit code each one means to a scheduler.

An *input error* (a bad config, data that is missing or does not fit at start, a checkpoint that
cannot be loaded) fails the same way every time: it exits 2 and is never retried. A *retryable
failure* (S3 unreachable past its retries, a shard that fails after start, a lost peer rank) may
pass: it exits 69 and the launcher restarts the group, `slurm/train.sh` requeues the job, and
the Kubernetes Job counts it against `backoffLimit`. A preempted run (SIGTERM/SIGUSR1) has
written its checkpoint and exits 75. This module is the one definition of these codes: the
trainer, the launcher and `slurm/train.sh` (through `python -m disent.errors --shell`) read them
from here, and a test holds `k8s/job.yaml` to them. The table is in docs/faults.md.

This module imports nothing from disent, so the launcher can use it without loading the rest.
"""
from __future__ import annotations

import enum
import sys


class ExitCode(enum.IntEnum):
    OK = 0
    INPUT_ERROR = 2  # as argparse's usage errors: fix the input, never retry
    RETRYABLE = 69  # EX_UNAVAILABLE: a service or peer failed at run time; restart from the checkpoint
    PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after writing a checkpoint; requeue
    INTERRUPTED = 130  # Ctrl-C (SIGINT), as a shell reports it: a checkpoint was written; run it again to resume


class InputError(ValueError):
    """Input a user must fix (config, data at start, a checkpoint); exit 2, one line, never retried."""

    exit_code = ExitCode.INPUT_ERROR


class RetryableFailure(RuntimeError):
    """A run-time failure that a restart from the latest checkpoint may get past; exit 69."""

    exit_code = ExitCode.RETRYABLE


def shell_assignments() -> str:
    """`EXIT_INPUT_ERROR=2 ...`, one per line, for shell scripts to eval."""
    return "\n".join(f"EXIT_{code.name}={int(code)}" for code in ExitCode)


if __name__ == "__main__":
    if sys.argv[1:] != ["--shell"]:
        sys.exit("usage: python -m disent.errors --shell")
    print(shell_assignments())
