"""The MLflow tracking server down at start, or killed (SIGKILL) and restarted mid-run, with a real
`mlflow server` on 127.0.0.1 restarted on the same port and sqlite store.

Training goes on; what was logged while the server was away reaches the run once it is back (or is
reported as dropped, with a count, when it never comes back); there is one run, not two.
"""
from __future__ import annotations

import logging
import socket
import subprocess
import sys
import uuid

import pytest

from disent.tracking import MLflowLogger
from tests.support.faultkit import BASE, base_env, mlflow_runs
from tests.support.mlflowserver import MLflowServer
from tests.support.processes import stop, wait_for
from tests.support.train_helpers import ROOT, logged_steps, metric_lines, tiny_overrides

LONG = {"train.steps": 240, "train.log_every": 10, "train.checkpoint_every": 1000}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MLflowServer(tmp_path_factory.mktemp("mlflow-faults"))
    srv.start()
    yield srv
    srv.stop()


def train(run_dir, data, uri, experiment):
    """Single-process `disent train` (only rank 0 talks to MLflow) in the background."""
    log_path = run_dir.parent / "train.log"
    cmd = [sys.executable, "-m", "disent.cli", "train", BASE,
           *tiny_overrides(run_dir, data, **{**LONG, "tracking.uri": uri, "tracking.experiment": experiment})]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=base_env(OMP_NUM_THREADS="1"), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log_path


def assert_everything_arrived(uri, experiment, run_dir):
    client, runs = mlflow_runs(uri, experiment)
    assert len(runs) == 1, [r.info.run_id for r in runs]  # no duplicate run
    r = runs[0]
    assert r.info.status == "FINISHED"
    logged = logged_steps(run_dir)
    assert logged == list(range(10, 241, 10))
    history = client.get_metric_history(r.info.run_id, "vae_loss")
    assert sorted(m.step for m in history) == logged  # every value, once
    assert r.data.params["model.z_dim"] == "4" and r.data.tags["world_size"] == "1"
    return r


@pytest.mark.slow
def test_server_killed_and_restarted_mid_run(tmp_path, tiny_data, server):
    experiment = "outage-" + uuid.uuid4().hex[:8]
    run = tmp_path / "run"
    proc, log = train(run, tiny_data, server.uri, experiment)
    try:
        wait_for(lambda: len(mlflow_runs(server.uri, experiment)[1]) == 1 and len(metric_lines(run)) >= 1, 180,
                 "the run to exist and log", proc, log, poll=0.2)
        server.kill()
        down_from = len(metric_lines(run))
        # training goes on while the server is away
        wait_for(lambda: len(metric_lines(run)) >= down_from + 3 or proc.poll() == 0, 120, "more steps", poll=0.2)
        server.start()
        rc = proc.wait(timeout=180)
    finally:
        stop(proc)
        if not server.healthy():
            server.start()
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert "cannot be reached" in text and "logging is queued and retried" in text
    assert "dropped" not in text and "did not reach" not in text
    assert_everything_arrived(server.uri, experiment, run)


@pytest.mark.slow
def test_server_down_at_start(tmp_path, tiny_data, server):
    experiment = "down-at-start-" + uuid.uuid4().hex[:8]
    run = tmp_path / "run"
    server.stop()
    try:
        proc, log = train(run, tiny_data, server.uri, experiment)
        try:
            wait_for(lambda: len(metric_lines(run)) >= 3, 180, "training to go on without MLflow", proc, log, poll=0.2)
        finally:
            server.start()
        rc = proc.wait(timeout=180)
    finally:
        stop(proc)
        if not server.healthy():
            server.start()
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert "cannot be reached" in text and "training goes on" in text
    r = assert_everything_arrived(server.uri, experiment, run)
    assert r.info.run_name == "tiny"


def test_a_server_that_never_comes_back_is_reported_with_a_count(caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    caplog.set_level(logging.INFO, logger="disent.tracking")
    logger = MLflowLogger(uri=f"http://user:pw-{uuid.uuid4().hex}@127.0.0.1:{port}", experiment="x")
    logger.start(run_name="never")
    for step in range(5):
        logger.log_metrics({"a": 1.0, "b": 2.0}, step=step)
    logger.close(timeout=3)
    assert "10 metric value(s)" in caplog.text and "did not reach the run" in caplog.text
    assert "pw-" not in caplog.text and "http://***@127.0.0.1" in caplog.text
