"""The background thread that empties a SendQueue into MLflow, backing off while it cannot.

A batch that fails is kept at the head of the queue and retried, after 1 s, 2 s, 4 s ... up to
retry_max_seconds (sooner when something new is logged); once close() was called, every
CLOSING_RETRY_S until its deadline. Errors that retrying cannot fix (PERMANENT_ERRORS) drop the
batch with a warning. The first outage warns once; later ones log at debug level.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from disent.io.urls import redact_url_credentials
from disent.tracking.sendqueue import Op, SendQueue

log = logging.getLogger(__package__)  # "disent.tracking", for every part of the package

CLOSING_RETRY_S = 2.0  # retry interval while close() waits for an unreachable server
# MLflow errors that retrying cannot fix: the item is dropped with a warning.
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"}


def permanent(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) in PERMANENT_ERRORS


class WarnOnce:
    """Logs its first message as a warning and the rest at debug level (one outage, one warning)."""

    def __init__(self):
        self.warned = False

    def __call__(self, message: str) -> None:
        log.log(logging.DEBUG if self.warned else logging.WARNING, message)
        self.warned = True


class Sender:
    """Sends the queue's batches with `send` on a daemon thread; counts failed attempts."""

    def __init__(self, queue: SendQueue, send: Callable[[list[Op]], None], where: str, warn: WarnOnce,
                 retry_max_seconds: float = 60.0):
        self.queue = queue
        self.send = send
        self.where = where  # the server, credentials redacted, for messages
        self.warn = warn
        self.retry_max_seconds = retry_max_seconds
        self.failures = 0  # failed attempts to send
        self.failing = False  # the last attempt failed
        self.deadline: float | None = None  # set by stop(): give up retrying after it
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mlflow-logger", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Send what is queued, retrying for up to timeout seconds; then the thread is gone (or left behind)."""
        self.deadline = time.monotonic() + timeout
        self.queue.close()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        delay = 1.0
        while (batch := self.queue.take()) is not None:
            try:
                self.send(batch)
            except Exception as exc:
                if not permanent(exc):
                    if not self._back_off(exc, delay):
                        return
                    delay = min(delay * 2, self.retry_max_seconds)
                    continue
                self.queue.drop(batch)
                log.warning("MLflow refused %s (%s); dropped", batch[0].kind, redact_url_credentials(str(exc)))
            else:
                self.queue.done(batch)
            self._recovered()
            delay = 1.0

    def _back_off(self, exc: Exception, delay: float) -> bool:
        """After a failed send: warn (once per outage), wait; False once the close deadline has passed."""
        self.failures += 1
        if not self.failing:
            self.warn(f"MLflow at {self.where} cannot be reached ({redact_url_credentials(str(exc))}); logging is "
                      "queued and retried")
        self.failing = True
        if self.queue.closed and self.deadline is not None and time.monotonic() > self.deadline:
            return False
        # While closing, try often: the run ends when the deadline passes, not at the next slot of a long backoff.
        self.queue.wait(delay, once_closed=CLOSING_RETRY_S)
        return True

    def _recovered(self) -> None:
        if self.failing:
            self.failing = False
            dropped = self.queue.dropped
            log.warning("MLflow is reachable again; queued logging sent%s",
                        f" ({dropped} metric values were dropped)" if dropped else "")
