"""Stop signals: what SIGTERM, SIGUSR1 and SIGINT mean to a run, in one place.

Slurm (and `kill -TERM -PGID`, and Kubernetes) send SIGTERM/SIGUSR1 to every process of a job step.
The training process turns them into "finish this step, checkpoint, exit 75" (:class:`PreemptionFlag`); Ctrl-C
(SIGINT) the same way with exit 130, as a shell reports an interrupted command (a second Ctrl-C interrupts at once).
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

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class stop_signals_held:
    """SIGTERM/SIGUSR1/SIGINT blocked in the calling thread inside the block.

    Processes started inside it (DataLoader workers) keep them blocked for good. This process loses
    nothing: a signal sent meanwhile is taken by another thread or when the block ends, and the
    trainer's handler runs as usual.
    """

    def __enter__(self):
        self._old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        return self

    def __exit__(self, *exc):
        signal.pthread_sigmask(signal.SIG_SETMASK, self._old)
        return False


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1/SIGINT; the trainer agrees on it across ranks every `train.stop_check_every` steps."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}
        self.settled = False

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user will not wait for the checkpoint
        if self.signal is None:
            again = " (Ctrl-C again to stop at once, without it)" if signum == signal.SIGINT else ""
            log.warning("received %s: finishing this step, then checkpointing%s", signal.Signals(signum).name, again)
        self.signal = signum

    def install(self) -> None:
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)

    def settle(self) -> None:
        """The last checkpoint is complete and the process is about to exit: ignore the stop signals from
        now on, for good (`restore()` keeps them ignored). Under `srun --kill-on-bad-exit` the first rank
        to exit 75 makes Slurm SIGTERM the slower ones while they close MLflow and the process group; that
        must not turn their 75 (or 0) into 143."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
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

    @property
    def interrupted(self) -> bool:
        """Stopped by Ctrl-C (SIGINT): the run exits 130, not 75 (nobody will requeue it)."""
        return self.signal == signal.SIGINT
