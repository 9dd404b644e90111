"""Stop signals: what SIGTERM and SIGUSR1 mean to a run, in one place.

Slurm (and `kill -TERM -PGID`, and Kubernetes) send SIGTERM/SIGUSR1 to every process of a job step.
The training process turns them into "finish this step, checkpoint, exit 75" (:class:`PreemptionFlag`).
Every other process a rank starts must not act on them: a DataLoader worker that died of SIGTERM would
crash the rank before its checkpoint. The one mechanism for that is :class:`stop_signals_held`: code
that starts worker processes does so inside it, and a forked (or spawned) process inherits the
starting thread's signal mask, so the workers never see the signals at all, with no window between
fork and any set-up code in which they could.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class stop_signals_held:
    """SIGTERM/SIGUSR1 blocked in the calling thread inside the block.

    Processes started inside it (DataLoader workers) keep them blocked for good. This process loses
    nothing: a signal sent meanwhile is taken by another thread or when the block ends, and the
    trainer's handler runs as usual.
    """

    def __enter__(self):
        self._old = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPT_SIGNALS)
        return self

    def __exit__(self, *exc):
        signal.pthread_sigmask(signal.SIG_SETMASK, self._old)
        return False


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1; the trainer agrees on it across ranks every `train.stop_check_every` steps."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}
        self.settled = False

    def _handler(self, signum, frame):
        if self.signal is None:
            log.warning("received %s: finishing this step, then checkpointing", signal.Signals(signum).name)
        self.signal = signum

    def install(self) -> None:
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)

    def settle(self) -> None:
        """The last checkpoint is complete and the process is about to exit: ignore SIGTERM/SIGUSR1 from
        now on, for good (`restore()` keeps them ignored). Under `srun --kill-on-bad-exit` the first rank
        to exit 75 makes Slurm SIGTERM the slower ones while they close MLflow and the process group; that
        must not turn their 75 (or 0) into 143."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        self.settled = True

    def restore(self) -> None:
        if not self.settled:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
        self._previous.clear()

    @property
    def raised(self) -> bool:
        return self.signal is not None
