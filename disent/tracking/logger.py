"""`MLflowLogger`: the one object training and evaluation log through. A thin facade over the parts
of this package: secret_filter says what may go in, SendQueue holds it, Sender sends it, MLflowRun is
where it goes."""
from __future__ import annotations

import logging
import os
import time
from typing import Any

from disent.io.urls import redact_url_credentials
from disent.process_group import from_rank_zero
from disent.tracking.run import MLflowRun, SystemMetrics, experiment_name, node_id, tracking_uri
from disent.tracking.secret_filter import safe_params, safe_tags
from disent.tracking.sender import Sender, WarnOnce
from disent.tracking.sendqueue import Op, SendQueue

log = logging.getLogger(__package__)
# MLflow's artifact progress bars print a line per file into every run's log; the run's own progress is enough.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

MAX_BATCH_PARAMS = 100  # MLflow's limit on the params in one log_batch


class MLflowLogger:
    """Rank-0 MLflow logging with a background sender. On other ranks every call is a no-op, but the first
    rank of each other node (local_rank 0; None: $LOCAL_RANK, else rank) runs MLflow's system-metrics monitor
    on the run from start() to close(), so every node's CPU, GPU and memory reach the run."""

    def __init__(
        self,
        uri: str | None = None,
        experiment: str = "disent",
        rank: int = 0,
        max_queued_metrics: int = 100_000,
        system_metrics: bool = False,
        retry_max_seconds: float = 60.0,
        local_rank: int | None = None,
    ):
        self.uri = uri or tracking_uri()
        self.experiment = experiment
        self.rank = rank
        self.enabled = rank == 0
        local_rank = int(os.environ.get("LOCAL_RANK", rank)) if local_rank is None else local_rank
        self.node_leader = self.enabled or local_rank == 0
        self._system = SystemMetrics(self.uri, system_metrics, node_id(rank))
        self._reachable = False  # whether rank 0 opened the run at start(), rather than queue its creation
        self._run = MLflowRun(self.uri, experiment, self._system)
        self._queue = SendQueue(max_queued_metrics)
        self._warn = WarnOnce()
        self._sender = Sender(self._queue, self._run.send, redact_url_credentials(self.uri), self._warn,
                              retry_max_seconds)

    @classmethod
    def from_config(cls, cfg, rank: int, local_rank: int | None = None) -> "MLflowLogger":
        return cls(
            uri=tracking_uri(cfg), experiment=experiment_name(cfg), rank=rank,
            system_metrics=cfg.tracking.system_metrics, local_rank=local_rank,
        )

    # ------------------------------------------------------------------ state, kept by the parts

    @property
    def run_id(self) -> str | None:
        return self._run.run_id

    @run_id.setter
    def run_id(self, value: str | None) -> None:
        self._run.run_id = value

    @property
    def resumed(self) -> bool:
        return self._run.resumed

    @property
    def system_metrics(self) -> bool:
        """Whether MLflow's system-metrics monitor runs with the run (settable until start())."""
        return self._system.enabled

    @system_metrics.setter
    def system_metrics(self, value: bool) -> None:
        self._system.enabled = bool(value)

    @property
    def max_queued_metrics(self) -> int:
        return self._queue.max_metrics

    @property
    def retry_max_seconds(self) -> float:
        return self._sender.retry_max_seconds

    @property
    def dropped_metrics(self) -> int:
        """Metric values that never reach the run (dropped for room, or refused by MLflow)."""
        return self._queue.dropped

    @property
    def failures(self) -> int:
        """Failed attempts to send."""
        return self._sender.failures

    # ------------------------------------------------------------------ lifecycle

    def start(self, run_id: str | None = None, run_name: str | None = None, params: dict | None = None,
              tags: dict | None = None) -> str | None:
        """Rank 0 creates (or, given run_id, resumes) the run; every rank returns the run id.

        Collective when torch.distributed is initialized: every rank must call it.
        """
        if self.enabled:
            self._open(run_id, run_name)
        self.run_id, self._run.resumed, reachable = from_rank_zero((self.run_id, self.resumed, self._reachable))
        if not self.enabled and self.node_leader and reachable:
            # A run rank 0 could not reach yet goes without the other nodes' metrics: their monitor would
            # block this rank on a server that is away, and no later collective tells them it is back.
            self._system.start(self.run_id, self.resumed)
        if params:
            self.log_params(params)
        if tags:
            self.set_tags(tags)
        return self.run_id

    def _open(self, run_id: str | None, run_name: str | None) -> None:
        """Open the run now, or, when MLflow cannot be reached, queue its creation; start the sender."""
        run = self._run
        run.resumed = run_id is not None
        try:
            run.run_id = run.open(run_id, run_name)
        except Exception as exc:  # unreachable server: train on, create the run later
            self._warn(f"MLflow at {redact_url_credentials(self.uri)} cannot be reached ({redact_url_credentials(str(exc))}); "
                       "training goes on and logging is retried")
            self._queue.put(Op("create", (run_id, run_name)))
            run.run_id = run_id
        else:
            self._reachable = True
            self._system.start(run.run_id, run.resumed)
        self._sender.start()

    def pending(self) -> int:
        return len(self._queue)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued has been sent (or timeout); True when the queue is empty."""
        if not self.enabled or not self._sender.running:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pending() == 0:
                return True
            time.sleep(0.05)
        return self.pending() == 0

    def close(self, status: str | None = "FINISHED", timeout: float = 60.0) -> None:
        """End the run with status (None: leave it as it is), sending what is queued for up to timeout
        seconds; what does not arrive is reported with a count."""
        self._system.finish()  # on every rank that runs a monitor, rank 0 or not
        if not self.enabled or not self._sender.running:
            return
        if status:
            self.set_status(status)
        self._sender.stop(timeout)
        left, unsent_metrics, dropped = len(self._queue), self._queue.queued_metrics, self._queue.dropped
        if left or dropped:
            log.warning(
                "MLflow logging ended with %d unsent item(s) (%d metric value(s)) and %d metric value(s) dropped "
                "earlier; they did not reach the run at %s", left, unsent_metrics, dropped,
                redact_url_credentials(self.uri),
            )
        elif self.failures:
            log.info("MLflow logging complete: everything queued while the server was away was sent")

    # ------------------------------------------------------------------ logging

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        items = list(self._run.new_params(safe_params(params)).items())
        for i in range(0, len(items), MAX_BATCH_PARAMS):
            self._queue.put(Op("params", dict(items[i : i + MAX_BATCH_PARAMS])))

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = safe_tags(tags)
        if clean:
            self._queue.put(Op("tags", clean))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        stamp = int(time.time() * 1000)
        values = [(key, float(value), stamp, int(step)) for key, value in metrics.items() if value is not None]
        if values:
            self._queue.put(Op("metrics", values, size=len(values)))

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        self._queue.put(Op("artifact", (str(local_path), artifact_path)))

    def register_model(self, name: str, artifact_path: str = "model") -> None:
        """Register the run's logged model (artifact_path, queued before this) as a new version of `name`."""
        if not self.enabled:
            return
        self._queue.put(Op("register", (name, artifact_path)))

    def set_status(self, status: str) -> None:
        """FINISHED / FAILED / KILLED end the run; SCHEDULED marks a preempted run to be resumed."""
        if not self.enabled:
            return
        self._queue.put(Op("status", status))
