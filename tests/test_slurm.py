"""slurm/train.sh on a real single-node Slurm cluster (127.0.0.1, 2 CPU tasks).

The cluster (tests/slurm_cluster.py) is started once for this module. The training command is
dist_probe.TRAIN_CMD (a small gloo program with the trainer's contract) until `disent train`
exists; slurm/train.sh takes it from $TRAIN_CMD. Needs root and the Debian packages
slurmctld slurmd slurm-client munge (installed on demand); skipped otherwise.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_probe import TRAIN_CMD, complete_checkpoints, current_step, read_done, read_starts, train_args
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


def submit(cluster: SlurmCluster, tmp_path: Path, steps: int, *, checkpoint_every: int = 5,
           step_time: float = 0.05, extra_env: dict[str, str] | None = None) -> tuple[str, Path, Path]:
    run_dir = tmp_path / "run"
    out = tmp_path / "slurm-%j.out"
    config, *overrides = train_args(run_dir, steps, checkpoint_every)
    assert not any(" " in part for part in TRAIN_CMD), "TRAIN_CMD is split on spaces by slurm/train.sh"
    env = {
        "PYTHON": sys.executable,
        "TRAIN_CMD": " ".join(TRAIN_CMD),
        "CONFIG": config,
        "OVERRIDES": " ".join(overrides),
        "DATA_URL": str(tmp_path / "data-url-from-env"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PROBE_MLFLOW": "1",
        "PROBE_STEP_TIME": str(step_time),
        **(extra_env or {}),
    }
    job = cluster.sbatch(SCRIPT, env=env, args=[*SBATCH_ARGS, f"--output={out}"], cwd=ROOT)
    return job, run_dir, Path(str(out).replace("%j", job))


def report(cluster: SlurmCluster, job: str, out: Path) -> str:
    text = out.read_text(errors="replace")[-6000:] if out.exists() else "(no job output file)"
    return f"\n=== scontrol show job {job}\n{cluster.job(job)}\n=== {out}\n{text}\n=== daemons\n{cluster.logs()}"


def wait_for_progress(cluster: SlurmCluster, job: str, out: Path, run_dir: Path, step: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if current_step(run_dir) >= step:
            return
        if cluster.job(job).get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            break
        time.sleep(0.2)
    pytest.fail(f"the job did not reach step {step} within {timeout}s" + report(cluster, job, out))


def assert_finished(cluster: SlurmCluster, job: str, out: Path, run_dir: Path, steps: int) -> dict:
    info = cluster.wait(job, timeout=120)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", report(cluster, job, out)
    done = read_done(run_dir)
    assert done is not None, "the run did not finish" + report(cluster, job, out)
    assert done["steps"] == steps and done["world_size"] == 2
    # One all_reduce of ones per step across both ranks: a resumed run carries the sum over.
    assert done["total"] == 2.0 * steps, done
    ckpts = complete_checkpoints(run_dir)
    assert ckpts and ckpts[-1] == steps, ckpts
    for step in ckpts:  # complete = every rank's shard plus the marker
        files = {p.name for p in (run_dir / "checkpoints" / f"step_{step:08d}").iterdir()}
        assert files == {"COMPLETE", "rank_0.json", "rank_1.json"}, (step, files)
    return done


def assert_mlflow_run(done: dict, tmp_path: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(done["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["probe_final_total"] == done["total"]


@pytest.mark.timeout(240)
def test_train_sh_runs_two_tasks_to_completion(cluster, tmp_path):
    steps = 10
    job, run_dir, out = submit(cluster, tmp_path, steps)
    done = assert_finished(cluster, job, out, run_dir, steps)

    starts = read_starts(run_dir)
    assert sorted(s["rank"] for s in starts) == [0, 1], starts
    port = 12000 + int(job) % 20000  # derived from the job id
    for s in starts:
        assert s["mode"] == "slurm" and s["world_size"] == 2 and s["local_world_size"] == 2
        assert s["master"] == f"{cluster.node}:{port}"
        assert s["omp_threads"] == "1"  # --cpus-per-task
        assert s["ds_accelerator"] == "cpu"
        assert s["config"]["data.url"] == str(tmp_path / "data-url-from-env")  # DATA_URL
        assert s["config"]["tracking.uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"  # MLFLOW_TRACKING_URI
    assert_mlflow_run(done, tmp_path)
    text = out.read_text()
    assert "launcher: mode=slurm" in text and "world=2" in text, text


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["signal", "scontrol-requeue"])
def test_preempted_job_requeues_and_resumes(cluster, tmp_path, how):
    """USR1 (what --signal=USR1@120 sends before the time limit) or `scontrol requeue` mid-run:
    the ranks checkpoint and exit 75, the job is requeued, and the second run resumes."""
    steps = 40
    job, run_dir, out = submit(cluster, tmp_path, steps, checkpoint_every=100, step_time=0.2)
    wait_for_progress(cluster, job, out, run_dir, step=5, timeout=120)  # a few steps in, far from the end
    if how == "signal":
        cmd = ["scancel", "--signal=USR1", job]  # to the job step's tasks, like --signal=USR1@120
    else:
        cmd = ["scontrol", "requeue", job]  # SIGTERM to the job, then back to the queue
    result = subprocess.run(cmd, env=cluster.command_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr + report(cluster, job, out)

    done = assert_finished(cluster, job, out, run_dir, steps)
    assert int(cluster.job(job)["Restarts"]) == 1, report(cluster, job, out)
    starts = read_starts(run_dir)
    first = [s for s in starts if s["slurm_restart"] in (None, "0")]
    second = [s for s in starts if s["slurm_restart"] == "1"]
    assert len(first) == 2 and len(second) == 2, starts
    resumed = {s["resumed_from"] for s in second}
    assert len(resumed) == 1 and 0 < resumed.pop() < steps, starts  # the stop checkpoint, not a rerun
    assert_mlflow_run(done, tmp_path)
    assert {s["config"]["tracking.uri"] for s in starts} == {f"sqlite:///{tmp_path / 'mlflow.db'}"}
    text = out.read_text()
    assert "exit 75" in text, report(cluster, job, out)
    if how == "signal":
        assert "Requeueing job" in text, report(cluster, job, out)


@pytest.mark.timeout(180)
def test_a_crashing_rank_fails_the_job_without_hanging(cluster, tmp_path):
    job, run_dir, out = submit(cluster, tmp_path, steps=200, step_time=0.1, extra_env={"PROBE_CRASH": "1:3"})
    start = time.monotonic()
    info = cluster.wait(job, timeout=90)
    assert info["JobState"] == "FAILED", report(cluster, job, out)
    assert info["ExitCode"] != "0:0" and int(info["Restarts"]) == 0
    assert time.monotonic() - start < 60
    assert read_done(run_dir) is None
    assert "crashing at step 3" in out.read_text()

