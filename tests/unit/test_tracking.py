"""MLflowLogger in one process: run creation and resume, secrets, an unreachable server, retries."""
from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from disent.io.urls import redact_url_credentials
from disent.tracking import DEFAULT_URI, MAX_PARAM_VALUE, MLflowLogger, safe_params, tracking_uri
from tests.support.train_helpers import free_port


def test_tracking_uri_precedence(monkeypatch):
    cfg = SimpleNamespace(tracking=SimpleNamespace(uri=None))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(cfg) == DEFAULT_URI == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking_uri(cfg) == "http://env:5000"
    cfg.tracking.uri = "http://cfg:5000"
    assert tracking_uri(cfg) == "http://cfg:5000"


def test_experiment_name_precedence(monkeypatch):
    """tracking.experiment, else MLflow's own MLFLOW_EXPERIMENT_NAME, else disent."""
    from disent.config import load_config
    from disent.tracking.run import experiment_name

    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    cfg = load_config("configs/base.yaml", ["name=x", "data.url=d"])
    assert experiment_name(cfg) == "disent"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team-runs")
    assert experiment_name(cfg) == "team-runs"
    assert experiment_name(load_config("configs/base.yaml", ["name=x", "data.url=d", "tracking.experiment=mine"])) == "mine"


def test_params_skip_secrets_redact_urls_and_cap_length():
    params = safe_params({
        "model.z_dim": 16, "deepspeed.vae.api_key": "x", "s3.secret_access_key": "y", "auth_token": "z",
        "db.password": "p", "data.url": "s3://user:pw@host/bucket", "long": "a" * 7000, "none": None,
    })
    assert params == {"model.z_dim": "16", "data.url": "s3://***@host/bucket", "long": "a" * MAX_PARAM_VALUE, "none": ""}
    assert redact_url_credentials("http://u:p@h:1/x and https://a@b") == "http://***@h:1/x and https://***@b"


def test_sqlite_run_create_log_and_resume(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    (tmp_path / "a.txt").write_text("hello")
    logger = MLflowLogger(uri, experiment="exp")
    run_id = logger.start(run_name="exp name", params={"a": 1, "b.token": "secret"}, tags={"world_size": 2})
    logger.log_metrics({"loss": 1.0, "lr": 0.1}, step=1)
    logger.log_metrics({"loss": 0.5}, step=2)
    logger.log_artifact(tmp_path / "a.txt", "files")
    logger.close(status="KILLED")
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.info.run_name == "exp name"
    assert run.data.params == {"a": "1"} and run.data.tags["world_size"] == "2"
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [1.0, 0.5]
    assert [f.path for f in client.list_artifacts(run_id, "files")] == ["files/a.txt"]

    resumed = MLflowLogger(uri, experiment="exp")
    assert resumed.start(run_id=run_id, params={"a": 2, "c": 3}) == run_id  # a changed: kept as first logged
    resumed.log_metrics({"loss": 0.25}, step=3)
    resumed.close()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"a": "1", "c": "3"}
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]


def test_resume_of_unknown_run_starts_a_new_one(tmp_path):
    logger = MLflowLogger(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = logger.start(run_id="0123456789abcdef0123456789abcdef")
    logger.close()
    assert run_id and run_id != "0123456789abcdef0123456789abcdef"


def test_other_ranks_do_nothing(tmp_path):
    logger = MLflowLogger(f"sqlite:///{tmp_path}/never.db", rank=1)
    assert logger.start(params={"a": 1}) is None
    logger.log_metrics({"x": 1.0}, step=1)
    logger.close()
    assert not (tmp_path / "never.db").exists()


def test_unreachable_server_never_blocks_and_counts_drops(caplog):
    caplog.set_level(logging.WARNING, logger="disent.tracking")
    logger = MLflowLogger(f"http://127.0.0.1:{free_port()}", max_queued_metrics=5, retry_max_seconds=0.2)
    t0 = time.monotonic()
    assert logger.start(params={"a": 1}) is None
    for step in range(20):
        logger.log_metrics({"loss": float(step)}, step=step)
    assert time.monotonic() - t0 < 15
    assert logger.dropped_metrics == 15
    logger.close(timeout=1)
    warnings = [r.getMessage() for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert len(warnings) == 1  # warned once
    assert any("unsent" in r.getMessage() for r in caplog.records)


def test_logging_is_retried_until_the_store_comes_back(tmp_path):
    """The store is unusable at first (a file sits where its directory goes); queued logging arrives later."""
    store = tmp_path / "later"
    store.write_text("not a directory")
    uri = f"sqlite:///{store}/mlflow.db"
    logger = MLflowLogger(uri, retry_max_seconds=0.2)
    assert logger.start(params={"p": 1}, tags={"t": "v"}) is None
    logger.log_metrics({"loss": 1.0}, step=1)
    time.sleep(0.5)
    assert logger.pending() > 0 and logger.failures > 0
    store.unlink()
    store.mkdir()
    assert logger.flush(timeout=30)
    assert logger.run_id
    logger.close()
    run = MlflowClient(uri).get_run(logger.run_id)
    assert run.data.params == {"p": "1"} and run.data.metrics == {"loss": 1.0} and run.data.tags["t"] == "v"


@pytest.mark.parametrize("status", ["FINISHED", "FAILED"])
def test_close_sets_status(tmp_path, status):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = MLflowLogger(uri)
    run_id = logger.start()
    logger.close(status=status)
    assert MlflowClient(uri).get_run(run_id).info.status == status


@pytest.mark.parametrize("env, rank, want", [
    ({}, 0, None),  # one process
    ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "0"}, 5, None),  # one node: MLflow's plain names
    ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"}, 4, "node_1"),
    ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "NODE_RANK": "0"}, 0, "node_0"),
    ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "2"}, 7, "node_3"),  # no node rank given: rank // LOCAL_WORLD_SIZE
])
def test_node_id_is_the_node_index_when_there_are_several(env, rank, want):
    from disent.tracking.run import node_id

    assert node_id(rank, env) == want


def test_the_first_rank_of_every_node_logs_its_system_metrics_to_the_run(tmp_path, monkeypatch):
    """Two nodes of two ranks each, in one process: the broadcast of rank 0's run is simulated, the store is real."""
    import disent.tracking.logger as logger_module

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("GROUP_RANK", "0")
    rank0 = MLflowLogger(uri, system_metrics=True, rank=0, local_rank=0)
    run_id = rank0.start()
    monkeypatch.setattr(logger_module, "from_rank_zero", lambda value: (run_id, False, True))
    others = []
    for rank in (1, 2, 3):
        monkeypatch.setenv("GROUP_RANK", str(rank // 2))
        others.append(MLflowLogger(uri, system_metrics=True, rank=rank, local_rank=rank % 2))
        assert others[-1].start() == run_id
    assert [o._system._monitor is not None for o in others] == [False, True, False]  # node 1's first rank only
    wanted = {f"system/{node}/cpu_utilization_percentage" for node in ("node_0", "node_1")}
    deadline = time.monotonic() + 30  # MLflow sends a monitor's first sample at once
    while not wanted <= set(MlflowClient(uri).get_run(run_id).data.metrics) and time.monotonic() < deadline:
        time.sleep(0.1)
    for logger in [*others, rank0]:
        logger.close()
    metrics = MlflowClient(uri).get_run(run_id).data.metrics
    assert wanted <= set(metrics), sorted(metrics)
    assert not [key for key in metrics if not key.startswith(("system/node_0/", "system/node_1/"))]
    assert all(o._system._monitor is None for o in others)  # stopped at close


def test_the_logged_model_pins_the_torch_release_that_trained_it(tmp_path):
    """pip resolves no local build (+cpu, +cu121): the requirement is the release, the MLmodel keeps the full build."""
    import torch
    import yaml
    from packaging.version import Version

    from disent.api import Model
    from disent.config import load_config
    from disent.models.vae import vae_from_config
    from disent.tracking.pyfunc import save_pyfunc, torch_requirement

    assert torch_requirement("2.5.1+cu121") == "torch==2.5.1" and torch_requirement("2.6.0") == "torch==2.6.0"
    cfg = load_config("configs/base.yaml", ["name=x", "data.url=d", "model.base_channels=8"])
    saved = save_pyfunc(Model(vae_from_config(cfg), cfg, "test", "cpu"), tmp_path / "model")
    requirements = (saved / "requirements.txt").read_text().split()
    assert f"torch=={Version(torch.__version__).public}" in requirements
    assert yaml.safe_load((saved / "MLmodel").read_text())["metadata"]["torch_version"] == torch.__version__
