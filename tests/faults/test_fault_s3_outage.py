"""A real S3 outage mid-run: SeaweedFS stopped long enough that the loader's retries run out, then
started again on the same endpoint with the same data.

The rank that cannot read its next shard exits 69 (a retryable failure), the launcher restarts the
group (attempts that start while the server is still down fail their manifest read with 69 too and
are restarted as well), and once the server is back the run resumes from its latest complete
checkpoint and finishes: one MLflow run on a real `mlflow server`, holding every step's metrics.
"""
from __future__ import annotations

import re

import pytest

from disent.errors import ExitCode
from tests.support.faultkit import finish, launch, mlflow_runs
from tests.support.mlflowserver import MLflowServer
from tests.support.processes import stop, wait_for
from tests.support.s3server import WeedServer
from tests.support.train_helpers import complete_checkpoints, logged_steps, resumed_from

STEPS = 240
BUCKET = "outage"


@pytest.mark.slow
def test_s3_outage_mid_run_is_restarted_and_the_run_finishes_in_one_mlflow_run(tmp_path, tiny_data):
    weed = WeedServer(tmp_path / "weed").start()
    mlflow = MLflowServer(tmp_path / "mlflow").start()
    proc = None
    try:
        client = weed.client()
        client.create_bucket(Bucket=BUCKET)
        for path in sorted(tiny_data.rglob("*")):
            if path.is_file():
                client.put_object(Bucket=BUCKET, Key=f"d/{path.relative_to(tiny_data)}", Body=path.read_bytes())
        run = tmp_path / "run"
        # Retries (4, from 0.3 s doubling) span a few seconds: longer than a blip, far shorter than the outage.
        env = {**weed.env(), "DISENT_S3_RETRIES": "4", "DISENT_S3_BACKOFF": "0.3"}
        proc, log = launch(run, f"s3://{BUCKET}/d", max_restarts=3, env=env, extra={
            "train.steps": STEPS, "train.checkpoint_every": 20, "train.log_every": 1, "tracking.uri": mlflow.uri,
            "tracking.run_name": "outage"})
        wait_for(lambda: complete_checkpoints(run), 240, "a first complete checkpoint", proc, log, poll=0.2)
        weed.stop()
        wait_for(lambda: "(a retryable failure); stopping the group and restarting (1/3)" in log.read_text(), 120,
                 "a rank to give up on S3 and the launcher to restart the group", proc, log, poll=0.2)
        weed.start()
        rc = finish(proc, timeout=600)
        client, runs = mlflow_runs(mlflow.uri)
        histories = {r.info.run_id: client.get_metric_history(r.info.run_id, "vae_loss") for r in runs}
    finally:
        if proc is not None:
            stop(proc)
        weed.stop()
        mlflow.stop()
    text = log.read_text(errors="replace")
    assert rc == 0, text[-5000:]

    # the failure was reported as retryable, naming what could not be read, and never as an input error
    failures = [line for line in text.splitlines() if line.startswith("disent: retryable failure")]
    assert failures and all(f"exit {int(ExitCode.RETRYABLE)}" in line for line in failures), text[-5000:]
    assert any(f"s3://{BUCKET}/d/" in line for line in failures), failures
    assert "config error" not in text and "Traceback" not in text
    assert weed.access_key not in text and weed.secret_key not in text
    restarts = re.findall(r"restarting \((\d)/3\)", text)
    assert 1 <= len(restarts) <= 3
    resumed = resumed_from(text)
    assert resumed and resumed[-1] >= 20, text[-5000:]

    assert complete_checkpoints(run)[-1] == STEPS
    logged = set(logged_steps(run))
    assert logged == set(range(1, STEPS + 1))
    assert len(runs) == 1, [r.info.run_name for r in runs]  # every attempt continued the one run
    assert runs[0].info.status == "FINISHED"
    assert {m.step for m in histories[runs[0].info.run_id]} == set(range(1, STEPS + 1))  # every step's metrics
