"""The bounded queue of what is waiting to be sent to MLflow, and its drop policy.

Bounded in metric values: when a put overflows it, the oldest queued metrics are dropped and
counted (params, tags, artifacts and status changes are never dropped for room). Consecutive
metric ops are taken as one batch, up to MLflow's batch limit.
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Any

MAX_BATCH_METRICS = 1000  # MLflow's limit on the metrics in one log_batch


@dataclass(eq=False)  # ops are compared by identity: two equal metric ops are still two values to send
class Op:
    kind: str  # create | metrics | params | tags | artifact | status | register
    payload: Any
    size: int = 1  # metric values in a metrics op


class SendQueue:
    """Ops in the order they were logged, shared by the logging threads and the sender thread."""

    def __init__(self, max_metrics: int):
        self.max_metrics = max_metrics
        self.dropped = 0  # metric values dropped, for room or because MLflow refused them
        self.closed = False  # close() was called: take() stops waiting once the queue is empty
        self._ops: collections.deque[Op] = collections.deque()
        self._metrics = 0  # metric values queued
        self._cv = threading.Condition()

    def __len__(self) -> int:
        with self._cv:
            return len(self._ops)

    @property
    def queued_metrics(self) -> int:
        with self._cv:
            return self._metrics

    def put(self, op: Op) -> None:
        """Queue op; when the metrics overflow the bound, drop the oldest metric ops and count them."""
        with self._cv:
            self._ops.append(op)
            if op.kind == "metrics":
                self._metrics += op.size
                while self._metrics > self.max_metrics:
                    victim = next((o for o in self._ops if o.kind == "metrics"), None)
                    if victim is None:
                        break
                    self._ops.remove(victim)
                    self._metrics -= victim.size
                    self.dropped += victim.size
            self._cv.notify()

    def take(self) -> list[Op] | None:
        """The next batch to send, left queued until done() or drop(); waits for one. None once
        closed and empty."""
        with self._cv:
            while not self._ops and not self.closed:
                self._cv.wait()
            return self._head_batch() if self._ops else None

    def _head_batch(self) -> list[Op]:
        """The head op; consecutive metric ops are merged up to MLflow's batch limit."""
        head = self._ops[0]
        if head.kind != "metrics":
            return [head]
        batch, total = [], 0
        for op in self._ops:
            if op.kind != "metrics" or total + op.size > MAX_BATCH_METRICS and batch:
                break
            batch.append(op)
            total += op.size
        return batch

    def done(self, batch: list[Op]) -> None:
        """batch was sent: unqueue what of it is still queued (a put may have dropped some meanwhile)."""
        self._remove(batch, count_dropped=False)

    def drop(self, batch: list[Op]) -> None:
        """batch can never be sent: unqueue it, counting its metric values as dropped."""
        self._remove(batch, count_dropped=True)

    def _remove(self, batch: list[Op], count_dropped: bool) -> None:
        with self._cv:
            for op in batch:
                if op not in self._ops:
                    continue
                self._ops.remove(op)
                if op.kind == "metrics":
                    self._metrics -= op.size
                    if count_dropped:
                        self.dropped += op.size

    def wait(self, seconds: float, once_closed: float) -> None:
        """Sleep up to seconds (up to once_closed after close()), woken early by a put or close()."""
        with self._cv:
            self._cv.wait(min(seconds, once_closed) if self.closed else seconds)

    def close(self) -> None:
        """No more waiting for ops: what is queued is still handed out, then take() returns None."""
        with self._cv:
            self.closed = True
            self._cv.notify_all()
