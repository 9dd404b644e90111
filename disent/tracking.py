"""MLflow tracking for multi-rank training: only rank 0 talks to MLflow.

`MLflowLogger.start()` creates the run (or resumes the one a checkpoint names) on rank 0 and
broadcasts the run id to every rank. Params, tags, metrics and artifacts are queued and sent by a
background thread, so logging never blocks a training step. If the tracking server cannot be
reached, the logger warns once, keeps what is queued and retries with backoff; when the queue
overflows, the oldest metrics are dropped and counted. Nothing whose key looks like a secret is
ever sent.
"""
from __future__ import annotations

import collections
import logging
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from disent.config import redact_url_credentials

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value
MAX_BATCH_METRICS = 1000
MAX_BATCH_PARAMS = 100
SECRET_KEY = re.compile(r"(key|secret|token|password|passwd|credential|auth)", re.IGNORECASE)
# MLflow errors that retrying cannot fix: the item is dropped with a warning.
CLOSING_RETRY_S = 2.0  # retry interval while close() waits for an unreachable server
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"}


def tracking_uri(cfg=None) -> str:
    """cfg.tracking.uri, else $MLFLOW_TRACKING_URI, else the local sqlite:///mlflow.db store."""
    uri = getattr(getattr(cfg, "tracking", None), "uri", None)
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def looks_secret(key: str) -> bool:
    return bool(SECRET_KEY.search(key.rsplit(".", 1)[-1]))


def safe_params(flat: dict[str, Any]) -> dict[str, str]:
    """MLflow params from a flattened config: secrets skipped, values stringified and capped."""
    out = {}
    for key, value in flat.items():
        if looks_secret(key):
            continue
        text = redact_url_credentials("" if value is None else str(value))
        out[key] = text[:MAX_PARAM_VALUE]
    return out


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    for var in ("DISENT_GIT_COMMIT", "GIT_COMMIT"):
        if os.environ.get(var):
            return os.environ[var]
    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    if not commit:
        return None
    try:
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty = ""
    return commit + ("-dirty" if dirty else "")


@dataclass
class _Op:
    kind: str  # create | metrics | params | tags | artifact | status
    payload: Any
    size: int = 1


class MLflowLogger:
    """Rank-0 MLflow logging with a background sender. On other ranks every call is a no-op."""

    def __init__(
        self,
        uri: str | None = None,
        experiment: str = "disent",
        rank: int = 0,
        max_queued_metrics: int = 100_000,
        system_metrics: bool = False,
        retry_max_seconds: float = 60.0,
    ):
        self.uri = uri or tracking_uri()
        self.experiment = experiment
        self.rank = rank
        self.enabled = rank == 0
        self.run_id: str | None = None
        self.resumed = False
        self.max_queued_metrics = max_queued_metrics
        self.system_metrics = system_metrics
        self.retry_max_seconds = retry_max_seconds
        self.dropped_metrics = 0
        self.failures = 0
        self._queued_metrics = 0
        self._pending: collections.deque[_Op] = collections.deque()
        self._cv = threading.Condition()
        self._closing = False
        self._failing = False
        self._warned = False
        self._thread: threading.Thread | None = None
        self._client = None
        self._monitor = None
        self._known_params: set[str] = set()

    # ------------------------------------------------------------------ setup

    @classmethod
    def from_config(cls, cfg, rank: int) -> "MLflowLogger":
        return cls(
            uri=tracking_uri(cfg), experiment=cfg.tracking.experiment, rank=rank,
            system_metrics=cfg.tracking.system_metrics,
        )

    def _make_client(self):
        # MLflow prints run URLs built from the tracking URI, credentials included; ours are redacted.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        if self.uri.startswith(("http://", "https://")):
            # We retry ourselves, in the background; MLflow's own retries would stall for minutes.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def start(self, run_id: str | None = None, run_name: str | None = None, params: dict | None = None,
              tags: dict | None = None) -> str | None:
        """Rank 0 creates (or, given run_id, resumes) the run; every rank returns the run id.

        Collective when torch.distributed is initialized: every rank must call it.
        """
        if self.enabled:
            self.resumed = run_id is not None
            try:
                self._client = self._make_client()
                self.run_id = self._open_run(run_id, run_name)
            except Exception as exc:  # unreachable server: train on, create the run later
                self._warn(f"MLflow at {redact_url_credentials(self.uri)} cannot be reached ({redact_url_credentials(str(exc))}); training goes on "
                           "and logging is retried")
                self._pending.append(_Op("create", (run_id, run_name)))
                self.run_id = run_id
            self._thread = threading.Thread(target=self._worker, name="mlflow-logger", daemon=True)
            self._thread.start()
            if self.run_id is not None and not self._pending:
                self._start_system_metrics()
        self.run_id = _broadcast(self.run_id)
        if params:
            self.log_params(params)
        if tags:
            self.set_tags(tags)
        return self.run_id

    def _open_run(self, run_id: str | None, run_name: str | None) -> str:
        if self._client is None:
            self._client = self._make_client()
        client = self._client
        if run_id is not None:
            try:
                run = client.get_run(run_id)
            except Exception as exc:
                if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise
                # e.g. a checkpoint copied to another tracking store: start a new run there
                log.warning("MLflow run %s from the checkpoint does not exist at %s; starting a new run", run_id,
                            redact_url_credentials(self.uri))
                self.resumed = False
                return self._open_run(None, run_name)
            self._known_params = set(run.data.params)
            if run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            log.info("resuming MLflow run %s", run_id)
            return run_id
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(self.experiment)
            except Exception:  # created by someone else meanwhile
                experiment = client.get_experiment_by_name(self.experiment)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        else:
            experiment_id = experiment.experiment_id
        run = client.create_run(experiment_id, run_name=run_name)
        log.info("created MLflow run %s (%s)", run.info.run_id, run_name)
        return run.info.run_id

    def _start_system_metrics(self) -> None:
        if not self.system_metrics or self._monitor is not None or self.run_id is None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=self.resumed, tracking_uri=self.uri)
            self._monitor.start()
        except Exception as exc:
            log.warning("MLflow system metrics are off: %s", exc)
            self._monitor = None

    # ------------------------------------------------------------------ public logging API

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: v for k, v in safe_params(params).items() if k not in self._known_params}
        self._known_params.update(clean)
        items = list(clean.items())
        for i in range(0, len(items), MAX_BATCH_PARAMS):
            self._put(_Op("params", dict(items[i : i + MAX_BATCH_PARAMS])))

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: redact_url_credentials(str(v))[:MAX_PARAM_VALUE] for k, v in tags.items() if v is not None and not looks_secret(k)}
        if clean:
            self._put(_Op("tags", clean))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        stamp = int(time.time() * 1000)
        values = []
        for key, value in metrics.items():
            if value is None:
                continue
            values.append((key, float(value), stamp, int(step)))
        if values:
            self._put(_Op("metrics", values, size=len(values)))

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        self._put(_Op("artifact", (str(local_path), artifact_path)))

    def set_status(self, status: str) -> None:
        """FINISHED / FAILED / KILLED end the run; SCHEDULED marks a preempted run to be resumed."""
        if not self.enabled:
            return
        self._put(_Op("status", status))

    # ------------------------------------------------------------------ queue

    def _put(self, op: _Op) -> None:
        with self._cv:
            self._pending.append(op)
            if op.kind == "metrics":
                self._queued_metrics += op.size
                while self._queued_metrics > self.max_queued_metrics:
                    victim = next((o for o in self._pending if o.kind == "metrics"), None)
                    if victim is None:
                        break
                    self._pending.remove(victim)
                    self._queued_metrics -= victim.size
                    self.dropped_metrics += victim.size
            self._cv.notify()

    def _take_batch(self) -> list[_Op]:
        """The head op; consecutive metric ops are merged up to MLflow's batch limit."""
        head = self._pending[0]
        if head.kind != "metrics":
            return [head]
        batch, total = [], 0
        for op in self._pending:
            if op.kind != "metrics" or total + op.size > MAX_BATCH_METRICS and batch:
                break
            batch.append(op)
            total += op.size
        return batch

    def _worker(self) -> None:
        delay = 1.0
        while True:
            with self._cv:
                while not self._pending and not self._closing:
                    self._cv.wait()
                if not self._pending:
                    return
                batch = self._take_batch()
            try:
                self._send(batch)
            except Exception as exc:
                if _permanent(exc):
                    dropped = sum(op.size for op in batch if op.kind == "metrics")
                    self.dropped_metrics += dropped
                    log.warning("MLflow refused %s (%s); dropped", batch[0].kind, redact_url_credentials(str(exc)))
                else:
                    self.failures += 1
                    if not self._failing:
                        self._warn(f"MLflow at {redact_url_credentials(self.uri)} cannot be reached ({redact_url_credentials(str(exc))}); logging is "
                                   "queued and retried")
                    self._failing = True
                    with self._cv:
                        if self._closing and self._close_deadline is not None and time.monotonic() > self._close_deadline:
                            return
                        # While closing, try often: the run ends when the deadline passes, not at the
                        # next slot of a long backoff.
                        self._cv.wait(timeout=min(delay, CLOSING_RETRY_S) if self._closing else delay)
                    delay = min(delay * 2, self.retry_max_seconds)
                    continue
            with self._cv:
                for op in batch:
                    if op in self._pending:
                        self._pending.remove(op)
                        if op.kind == "metrics":
                            self._queued_metrics -= op.size
            if self._failing:
                self._failing = False
                log.warning("MLflow is reachable again; queued logging sent%s",
                            f" ({self.dropped_metrics} metric values were dropped)" if self.dropped_metrics else "")
            delay = 1.0

    _close_deadline: float | None = None

    def _send(self, batch: list[_Op]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if self._client is None:
            self._client = self._make_client()
        client = self._client
        head = batch[0]
        if head.kind == "create":
            wanted_id, run_name = head.payload
            self.run_id = self._open_run(wanted_id, run_name)
            self._start_system_metrics()
            return
        if self.run_id is None:
            raise RuntimeError("the MLflow run does not exist yet")
        if head.kind == "metrics":
            metrics = [Metric(k, v, t, s) for op in batch for (k, v, t, s) in op.payload]
            client.log_batch(self.run_id, metrics=metrics, synchronous=True)
        elif head.kind == "params":
            client.log_batch(self.run_id, params=[Param(k, v) for k, v in head.payload.items()], synchronous=True)
        elif head.kind == "tags":
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in head.payload.items()], synchronous=True)
        elif head.kind == "artifact":
            path, artifact_path = head.payload
            if not os.path.exists(path):
                log.warning("artifact %s no longer exists; not logged", path)
                return
            if os.path.isdir(path):
                client.log_artifacts(self.run_id, path, artifact_path)
            else:
                client.log_artifact(self.run_id, path, artifact_path)
        elif head.kind == "status":
            if head.payload in ("FINISHED", "FAILED", "KILLED"):
                client.set_terminated(self.run_id, head.payload)
            else:
                client.update_run(self.run_id, status=head.payload)
        else:  # pragma: no cover
            raise ValueError(head.kind)

    def _warn(self, message: str) -> None:
        if not self._warned:
            log.warning(message)
            self._warned = True
        else:
            log.debug(message)

    # ------------------------------------------------------------------ teardown

    def pending(self) -> int:
        with self._cv:
            return len(self._pending)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued has been sent (or timeout); True when the queue is empty."""
        if not self.enabled or self._thread is None:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pending() == 0:
                return True
            time.sleep(0.05)
        return self.pending() == 0

    def close(self, status: str | None = "FINISHED", timeout: float = 60.0) -> None:
        if not self.enabled or self._thread is None:
            return
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as exc:  # pragma: no cover
                log.debug("system metrics monitor: %s", exc)
            self._monitor = None
        if status:
            self.set_status(status)
        with self._cv:
            self._closing = True
            self._close_deadline = time.monotonic() + timeout
            self._cv.notify_all()
        self._thread.join(timeout)
        with self._cv:
            left = len(self._pending)
            unsent_metrics = self._queued_metrics
        if left or self.dropped_metrics:
            log.warning(
                "MLflow logging ended with %d unsent item(s) (%d metric value(s)) and %d metric value(s) dropped "
                "earlier; they did not reach the run at %s", left, unsent_metrics, self.dropped_metrics,
                redact_url_credentials(self.uri),
            )
        elif self.failures:
            log.info("MLflow logging complete: everything queued while the server was away was sent")
        self._thread = None


def _permanent(exc: Exception) -> bool:
    code = getattr(exc, "error_code", None)
    return code in PERMANENT_ERRORS


def _broadcast(value: Any) -> Any:
    """rank 0's value on every rank (a no-op without a process group)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return value
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
