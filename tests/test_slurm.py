"""slurm/train.sh on a real single-node Slurm cluster (127.0.0.1, 2 CPU tasks), running the real trainer.

The cluster (tests/slurm_cluster.py) is started once for this module, and so are the tiny real shards
and the MLflow store. Each job runs `disent train configs/base.yaml <tiny overrides>` through
slurm/train.sh ($TRAIN_CMD, $CONFIG, $OVERRIDES, $DATA_URL, $MLFLOW_TRACKING_URI) and the tests check
what the run left behind: checkpoints, metrics.jsonl, the MLflow run. Needs root and the Debian
packages slurmctld slurmd slurm-client munge (installed on demand); skipped otherwise.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch_helpers import (
    TRAIN_CMD,
    assert_finished,
    complete_checkpoints,
    logged_steps,
    mlflow_store,
    rank_pids,
    resumed_from,
    tiny_data,
    train_args,
)
from slurm_cluster import SlurmCluster, SlurmUnavailable

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "slurm" / "train.sh"
# 2 CPU tasks on one node; no GPUs on the test machine.
SBATCH_ARGS = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster():
    c = SlurmCluster()
    try:
        c.start()
    except SlurmUnavailable as exc:
        pytest.skip(str(exc))
    yield c
    c.cleanup()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return mlflow_store(tmp_path_factory)


def submit(cluster: SlurmCluster, tmp_path: Path, data: Path, store: str, *, steps: int,
           extra_env: dict[str, str] | None = None, **overrides) -> tuple[str, Path, Path]:
    """sbatch slurm/train.sh: data.url from $DATA_URL and tracking.uri from $MLFLOW_TRACKING_URI (the
    overrides leave both out); the MLflow experiment is the test's own."""
    run_dir = tmp_path / "run"
    out = tmp_path / "slurm-%j.out"
    config, *rest = train_args(run_dir, None, steps=steps, tracking_uri="", experiment=tmp_path.name, **overrides)
    assert not any(" " in part for part in [*TRAIN_CMD, *rest]), "slurm/train.sh splits on spaces"
    env = {
        "PYTHON": sys.executable,
        "TRAIN_CMD": " ".join(TRAIN_CMD),
        "CONFIG": config,
        "OVERRIDES": " ".join(rest),
        "DATA_URL": str(data),
        "MLFLOW_TRACKING_URI": store,
        **(extra_env or {}),
    }
    job = cluster.sbatch(SCRIPT, env=env, args=[*SBATCH_ARGS, f"--output={out}"], cwd=ROOT)
    return job, run_dir, Path(str(out).replace("%j", job))


def report(cluster: SlurmCluster, job: str, out: Path) -> str:
    text = out.read_text(errors="replace")[-6000:] if out.exists() else "(no job output file)"
    return f"\n=== scontrol show job {job}\n{cluster.job(job)}\n=== {out}\n{text}\n=== daemons\n{cluster.logs()}"


def wait_for(cluster: SlurmCluster, job: str, out: Path, predicate, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if cluster.job(job).get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            break
        time.sleep(0.1)
    pytest.fail(f"no {what} within {timeout}s" + report(cluster, job, out))


def wait_completed(cluster: SlurmCluster, job: str, out: Path, timeout: float) -> str:
    info = cluster.wait(job, timeout=timeout)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", report(cluster, job, out)
    return out.read_text(errors="replace")


@pytest.mark.timeout(150)
def test_train_sh_runs_two_tasks_to_completion(cluster, tmp_path, data, store):
    steps = 6
    job, run_dir, out = submit(cluster, tmp_path, data, store, steps=steps, checkpoint_every=3)
    text = wait_completed(cluster, job, out, timeout=130)
    run = assert_finished(run_dir, steps, world_size=2, tracking_uri=store, experiment=tmp_path.name)
    assert complete_checkpoints(run_dir) == [3, 6]
    assert run["params"]["data.url"] == str(data)  # DATA_URL
    assert run["params"]["tracking.uri"] == store  # MLFLOW_TRACKING_URI (and the run is in that store)
    assert run["tags"]["device_type"] == "cpu"
    port = 12000 + int(job) % 20000  # derived from the job id
    topology = f"launcher: mode=slurm (job {job}) world=2 nodes=1 ranks/node=2 master={cluster.node}:{port}"
    assert text.count(topology) == 1, text[-4000:]  # only rank 0 prints it
    assert "threads/rank=1" in text  # --cpus-per-task
    assert f"disent: trained {steps} steps" in text and "srun exited with 0" in text


@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", ["signal", "scontrol-requeue"])
def test_preempted_job_requeues_and_resumes(cluster, tmp_path, data, store, how):
    """USR1 (what --signal=USR1@120 sends before the time limit) or `scontrol requeue` (SIGTERM) mid-run,
    to every process of the step, DataLoader workers included: the ranks checkpoint and exit 75, the
    job is requeued, and the second run resumes from that checkpoint and finishes, in one MLflow run."""
    steps, log_every = 80, 4
    job, run_dir, out = submit(cluster, tmp_path, data, store, steps=steps, log_every=log_every,
                               **{"data.num_workers": 1})
    wait_for(cluster, job, out, lambda: logged_steps(run_dir), "logged step", timeout=120)
    if how == "signal":
        cmd = ["scancel", "--signal=USR1", job]  # to the job step's processes, like --signal=USR1@120
    else:
        cmd = ["scontrol", "requeue", job]  # SIGTERM to the job, then back to the queue
    result = subprocess.run(cmd, env=cluster.command_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr + report(cluster, job, out)

    text = wait_completed(cluster, job, out, timeout=180)
    assert int(cluster.job(job)["Restarts"]) == 1, report(cluster, job, out)
    assert "exit 75 (requeue to resume)" in text, report(cluster, job, out)
    if how == "signal":  # the script requeues (scontrol requeue: Slurm did, and signalled the script too)
        assert "srun exited with 75" in text and "Requeueing job" in text, report(cluster, job, out)
    assert "DataLoader worker" not in text, report(cluster, job, out)  # no worker died of the signal
    (resumed,) = resumed_from(text)  # the requeued run, from the stop checkpoint
    assert 0 < resumed < steps and resumed in complete_checkpoints(run_dir), report(cluster, job, out)
    assert f"preempted at step {resumed}" in text
    # every step logged once (metrics continue from the stop checkpoint), one FINISHED MLflow run
    assert_finished(run_dir, steps, world_size=2, log_every=log_every, tracking_uri=store, experiment=tmp_path.name)


@pytest.mark.timeout(150)
def test_a_killed_rank_fails_the_job_without_hanging(cluster, tmp_path, data, store):
    """SIGKILL one task's trainer once a checkpoint exists: srun --kill-on-bad-exit ends the step,
    the job fails (no requeue, no hang) and the checkpoint stays for a resubmission."""
    job, run_dir, out = submit(cluster, tmp_path, data, store, steps=400, checkpoint_every=5)
    wait_for(cluster, job, out, lambda: complete_checkpoints(run_dir), "complete checkpoint", timeout=120)
    pids = rank_pids(run_dir, 1)
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    start = time.monotonic()
    info = cluster.wait(job, timeout=90)
    assert info["JobState"] == "FAILED", report(cluster, job, out)
    assert info["ExitCode"] != "0:0" and int(info["Restarts"]) == 0
    assert time.monotonic() - start < 60, report(cluster, job, out)
    assert not (run_dir / "final").exists()
    assert complete_checkpoints(run_dir), report(cluster, job, out)


@pytest.mark.timeout(300)
def test_a_retryable_failure_requeues_the_job_which_resumes_and_its_output_reads_well(cluster, tmp_path, data, store):
    """The training shards vanish mid-run (moved away once a checkpoint exists, back once the job has
    failed): the ranks exit 69, slurm/train.sh requeues the job (retry 1/3), and the requeued job
    resumes from its checkpoint and finishes in the same MLflow run. The output file, read as a user
    reads it: train.progress at its default (true) but stderr a file, so plain progress lines and no
    tqdm redraws, and none of the libraries' start-up warnings."""
    own = tmp_path / "data"
    shutil.copytree(data, own)
    steps, log_every = 240, 10
    job, run_dir, out = submit(cluster, tmp_path, own, store, steps=steps, log_every=log_every, checkpoint_every=10,
                               **{"train.progress": "true"})
    wait_for(cluster, job, out, lambda: complete_checkpoints(run_dir), "complete checkpoint", timeout=120)
    shards = sorted((own / "train").glob("shard-*.tar"))
    for shard in shards:
        shard.rename(shard.with_name(shard.name + ".away"))
    wait_for(cluster, job, out, lambda: "srun exited with 69" in out.read_text(errors="replace"),
             "retryable failure", timeout=120)
    for shard in shards:
        shard.with_name(shard.name + ".away").rename(shard)
    text = wait_completed(cluster, job, out, timeout=180)

    assert int(cluster.job(job)["Restarts"]) == 1, report(cluster, job, out)
    assert f"requeueing job {job} (retry 1/3)" in text, report(cluster, job, out)
    failures = [line for line in text.splitlines() if line.startswith("disent: retryable failure (exit 69")]
    assert any("is missing" in line and str(own / "train") in line for line in failures), report(cluster, job, out)
    assert "config error" not in text and "Traceback" not in text
    (resumed,) = resumed_from(text)
    assert 0 < resumed < steps and resumed % 10 == 0  # a checkpoint step (older ones are pruned since)
    assert_finished(run_dir, steps, world_size=2, log_every=log_every, tracking_uri=store, experiment=tmp_path.name,
                    repeats=True)
    # the output file reads well
    assert "\r" not in text
    progress = re.findall(r"step (\d+)/240 vae_loss=\S+ disc_loss=\S+ samples_per_s=\S+ eta \d+m\d\ds", text)
    assert {int(s) for s in progress} >= set(range(log_every, steps + 1, log_every)), text[-3000:]
    for noise in ("Attempting to get learning rate", "FutureWarning", "all_gather_into_tensor"):
        assert noise not in text, noise
    (tmp_path.parent / f"{tmp_path.name}-sbatch-output.txt").write_text(text)  # kept for reading


@pytest.mark.timeout(480)
def test_a_sweep_is_one_job_array_whose_preempted_point_requeues_and_the_last_point_summarises(
        cluster, tmp_path, data, store):
    """`disent sweep --backend slurm`: 2 points, one array task each (1 CPU task apiece, side by side).
    Point 1 is preempted mid-run (`scontrol requeue JOB_1`) and requeued on its own; it resumes from its
    checkpoint. Both finish, each as a child of the sweep's parent MLflow run, and the last to end
    writes the summary and finishes the parent."""
    from mlflow.tracking import MlflowClient

    steps = 40
    config, *rest = train_args(tmp_path / "unused", data, steps=steps, log_every=4, tracking_uri="",
                               experiment=tmp_path.name)
    fixed = [o for o in rest if not o.startswith(("run_dir=", "tracking.run_name="))]
    sweep_dir = tmp_path / "sweep"
    out = tmp_path / "slurm-%A_%a.out"
    sbatch = ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
              f"--output={out}"]
    cmd = [sys.executable, "-m", "disent.cli", "sweep", config, *fixed, "loss.adversarial=0.01,0.05",
           "--backend", "slurm", "--tracking-uri", store, "--run-dir", str(sweep_dir), "--name", "slurm sweep",
           *(f"--sbatch-arg={a}" for a in sbatch)]
    env = cluster.command_env({"PYTHON": sys.executable, "TRAIN_CMD": " ".join(TRAIN_CMD)})
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    (job,) = re.findall(r"submitted job array (\d+)", result.stderr)
    tasks = [f"{job}_0", f"{job}_1"]
    outputs = [Path(str(out).replace("%A", job).replace("%a", str(i))) for i in range(2)]

    point1 = sweep_dir / "point-001"
    wait_for(cluster, tasks[1], outputs[1], lambda: logged_steps(point1), "logged step of point 1", timeout=200)
    requeue = subprocess.run(["scontrol", "requeue", tasks[1]], env=cluster.command_env(), capture_output=True,
                             text=True, timeout=30)
    assert requeue.returncode == 0, requeue.stderr + report(cluster, tasks[1], outputs[1])
    for task, output in zip(tasks, outputs):
        info = cluster.wait(task, timeout=300)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", report(cluster, task, output)
    assert int(cluster.job(tasks[1])["Restarts"]) == 1, report(cluster, tasks[1], outputs[1])
    text1 = outputs[1].read_text(errors="replace")
    assert "exit 75 (requeue to resume)" in text1 and resumed_from(text1), report(cluster, tasks[1], outputs[1])
    assert logged_steps(point1)[-1] == steps and logged_steps(sweep_dir / "point-000")[-1] == steps

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name(tmp_path.name)
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`disent.kind` = 'sweep'")
    kids = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(k.info.run_name for k in kids) == ["loss.adversarial=0.01", "loss.adversarial=0.05"]
    assert all(k.info.status == "FINISHED" for k in kids)
    assert parent.info.status == "FINISHED", [o.read_text()[-2000:] for o in outputs]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "summary")} == {
        "summary/summary.csv", "summary/leakage.png"}
    assert sum("disent sweep: summarised" in o.read_text() for o in outputs) >= 1
