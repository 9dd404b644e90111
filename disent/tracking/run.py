"""One MLflow run seen from rank 0: the client, creating or resuming the run, sending queued ops to
it; and MLflow's system-metrics monitor for it, which the first rank of every node runs."""
from __future__ import annotations

import logging
import os

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from disent.io.urls import redact_url_credentials
from disent.tracking.sendqueue import Op

log = logging.getLogger(__package__)

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "disent"


def tracking_uri(cfg=None) -> str:
    """cfg.tracking.uri, else $MLFLOW_TRACKING_URI, else the local sqlite:///mlflow.db store."""
    uri = getattr(getattr(cfg, "tracking", None), "uri", None)
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def experiment_name(cfg=None) -> str:
    """cfg.tracking.experiment, else $MLFLOW_EXPERIMENT_NAME (MLflow's own variable), else "disent"."""
    name = getattr(getattr(cfg, "tracking", None), "experiment", None)
    return name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def quiet_mlflow(uri: str) -> None:
    """MLflow's settings for talking to uri from this process (unless set): no URLs printed, short HTTP retries."""
    # MLflow prints run URLs built from the tracking URI, credentials included; ours are redacted.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if uri.startswith(("http://", "https://")):
        # We retry ourselves, in the background; MLflow's own retries would stall for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def make_client(uri: str):
    quiet_mlflow(uri)
    return MlflowClient(tracking_uri=uri)


def node_id(rank: int, env=os.environ) -> str | None:
    """The system metrics' node label, node_<i> for this process's node (GROUP_RANK/NODE_RANK as the launcher and
    torchrun set them, else rank // LOCAL_WORLD_SIZE), when the job spans several nodes; None on one node (MLflow's
    plain system/ names). An index, not the hostname: a requeued job lands on other hosts, and its resumed run
    should keep its metric names."""
    world = int(env.get("WORLD_SIZE") or 1)
    per_node = max(1, int(env.get("LOCAL_WORLD_SIZE") or world))
    given = env.get("GROUP_RANK") or env.get("NODE_RANK")
    index = int(given) if given else rank // per_node
    return None if index == 0 and world <= per_node else f"node_{index}"


class SystemMetrics:
    """MLflow's system-metrics monitor (CPU, GPU, memory) for the run, when enabled; off on any error.
    With a node_id its metrics are system/<node_id>/..., so the nodes of one run do not overwrite each other."""

    def __init__(self, uri: str, enabled: bool, node_id: str | None = None):
        self.uri = uri
        self.enabled = enabled
        self.node_id = node_id
        self._monitor = None

    def start(self, run_id: str | None, resumed: bool) -> None:
        if not self.enabled or self._monitor is not None or run_id is None:
            return
        quiet_mlflow(uri=self.uri)  # also on a node whose process makes no client of its own
        try:
            # lazy: it needs psutil, which MLflow does not require; without it only these metrics are off
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(run_id, resume_logging=resumed, node_id=self.node_id,
                                                 tracking_uri=self.uri)
            self._monitor.start()
        except Exception as exc:
            log.warning("MLflow system metrics are off: %s", redact_url_credentials(str(exc)))
            self._monitor = None

    def finish(self) -> None:
        if self._monitor is None:
            return
        try:
            self._monitor.finish()
        except Exception as exc:  # pragma: no cover
            log.debug("system metrics monitor: %s", exc)
        self._monitor = None


class MLflowRun:
    """The run in experiment `experiment` at `uri`, and how each kind of queued op reaches it."""

    def __init__(self, uri: str, experiment: str, system: SystemMetrics):
        self.uri = uri
        self.experiment = experiment
        self.system = system
        self.run_id: str | None = None
        self.resumed = False
        self.known_params: set[str] = set()  # params the run has (or has queued): never logged twice
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = make_client(self.uri)
        return self._client

    def new_params(self, params: dict[str, str]) -> dict[str, str]:
        """The params the run does not have yet, now counted as logged (a resumed run keeps its first values)."""
        fresh = {k: v for k, v in params.items() if k not in self.known_params}
        self.known_params.update(fresh)
        return fresh

    def open(self, run_id: str | None, run_name: str | None) -> str:
        """Resume run_id (a new run when the store does not have it), or create a run; its id."""
        if run_id is not None:
            try:
                return self._resume(run_id)
            except Exception as exc:
                if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise
                # e.g. a checkpoint copied to another tracking store: start a new run there
                log.warning("MLflow run %s from the checkpoint does not exist at %s; starting a new run", run_id,
                            redact_url_credentials(self.uri))
                self.resumed = False
        run = self.client.create_run(self._experiment_id(), run_name=run_name)
        log.info("created MLflow run %s (%s)", run.info.run_id, run_name)
        return run.info.run_id

    def _resume(self, run_id: str) -> str:
        run = self.client.get_run(run_id)
        self.known_params = set(run.data.params)
        if run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        log.info("resuming MLflow run %s", run_id)
        return run_id

    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(self.experiment)
        except Exception:  # created by someone else meanwhile
            experiment = self.client.get_experiment_by_name(self.experiment)
            if experiment is None:
                raise
            return experiment.experiment_id

    def send(self, batch: list[Op]) -> None:
        """Send one batch from the queue (all ops of one kind; raises when it did not arrive)."""
        head = batch[0]
        if head.kind == "create":
            self.run_id = self.open(*head.payload)
            self.system.start(self.run_id, self.resumed)
            return
        if self.run_id is None:
            raise RuntimeError("the MLflow run does not exist yet")
        if head.kind == "metrics":
            metrics = [Metric(k, v, t, s) for op in batch for (k, v, t, s) in op.payload]
            self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)
        elif head.kind == "params":
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in head.payload.items()], synchronous=True)
        elif head.kind == "tags":
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in head.payload.items()], synchronous=True)
        elif head.kind == "artifact":
            self._send_artifact(*head.payload)
        elif head.kind == "status":
            self._send_status(head.payload)
        elif head.kind == "register":
            self._send_register(*head.payload)
        else:  # pragma: no cover
            raise ValueError(head.kind)

    def _send_artifact(self, path: str, artifact_path: str | None) -> None:
        if not os.path.exists(path):
            log.warning("artifact %s no longer exists; not logged", path)
        elif os.path.isdir(path):
            self.client.log_artifacts(self.run_id, path, artifact_path)
        else:
            self.client.log_artifact(self.run_id, path, artifact_path)

    def _send_register(self, name: str, artifact_path: str) -> None:
        register_run_model(self.client, name, self.run_id, artifact_path)

    def _send_status(self, status: str) -> None:
        if status in ("FINISHED", "FAILED", "KILLED"):
            self.client.set_terminated(self.run_id, status)
        else:
            self.client.update_run(self.run_id, status=status)


def register_run_model(client, name: str, run_id: str, artifact_path: str = "model") -> str:
    """A new version of registered model `name` from a run's model artifact (the registered model is
    created on first use); its version. When the latest version already is this run's model (a sweep
    summarised again, a retry after a lost reply) that version is returned and none is added."""
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    versions = client.search_model_versions(f"name='{name}'")
    latest = max(versions, key=lambda v: int(v.version), default=None)
    if latest is not None and latest.run_id == run_id and latest.source == source:
        return str(latest.version)
    version = client.create_model_version(name, source=source, run_id=run_id)
    log.info("registered run %s's model as %s version %s (models:/%s/%s)", run_id, name, version.version, name,
             version.version)
    return str(version.version)
