"""slurm/train.sh on a real single-node Slurm cluster (127.0.0.1, 2 CPU tasks), running the real trainer.

The cluster (tests/support/slurm_cluster.py) is started once for this module, and so is the MLflow store; the
tiny real shards are the session's. Each job runs `disent train configs/base.yaml <tiny overrides>` through
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

from disent.errors import ExitCode
from tests.support.launch_helpers import TRAIN_CMD, assert_finished, mlflow_store, train_args
from tests.support.processes import rank_pids, wait_for
from tests.support.slurm_cluster import TERMINAL, SlurmCluster, SlurmUnavailable
from tests.support.train_helpers import ROOT, complete_checkpoints, logged_steps, resumed_from

SCRIPT = ROOT / "slurm" / "train.sh"
# 2 CPU tasks on one node; no GPUs on the test machine.
SBATCH_ARGS = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]


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


def wait_for_job(cluster: SlurmCluster, job: str, out: Path, predicate, what: str, timeout: float) -> None:
    """wait_for `predicate` while the job lasts (a requeued job, pending again, still does)."""
    def ended() -> str | None:
        state = cluster.job(job).get("JobState")
        return f"job {job} ended ({state})" if state in TERMINAL else None

    wait_for(predicate, timeout, what, ended=ended, describe=lambda: report(cluster, job, out))


def wait_completed(cluster: SlurmCluster, job: str, out: Path, timeout: float) -> str:
    info = cluster.wait(job, timeout=timeout)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", report(cluster, job, out)
    return out.read_text(errors="replace")


@pytest.mark.timeout(150)
def test_train_sh_runs_two_tasks_to_completion(cluster, tmp_path, tiny_data, store):
    steps = 6
    job, run_dir, out = submit(cluster, tmp_path, tiny_data, store, steps=steps, checkpoint_every=3)
    text = wait_completed(cluster, job, out, timeout=130)
    run = assert_finished(run_dir, steps, world_size=2, tracking_uri=store, experiment=tmp_path.name)
    assert complete_checkpoints(run_dir) == [3, 6]
    assert run["params"]["data.url"] == str(tiny_data)  # DATA_URL
    assert run["params"]["tracking.uri"] == store  # MLFLOW_TRACKING_URI (and the run is in that store)
    assert run["tags"]["device_type"] == "cpu"
    port = 12000 + int(job) % 20000  # derived from the job id
    topology = f"launcher: mode=slurm (job {job}) world=2 nodes=1 ranks/node=2 master={cluster.node}:{port}"
    assert text.count(topology) == 1, text[-4000:]  # only rank 0 prints it
    assert "threads/rank=1" in text  # --cpus-per-task
    assert f"disent: trained {steps} steps" in text and "srun exited with 0" in text


# TRAIN_CMD for the CPU test: what a task started by slurm/train.sh gets (its arguments, the config and
# overrides, are ignored).
CPU_PROBE = """\
import os, subprocess
step = f"{os.environ['SLURM_JOB_ID']}.{os.environ['SLURM_STEP_ID']}"
shown = subprocess.run(["scontrol", "show", "step", "--oneliner", step], capture_output=True, text=True).stdout
print(f"probe: affinity={len(os.sched_getaffinity(0))} SLURM_CPUS_PER_TASK={os.environ.get('SLURM_CPUS_PER_TASK')} "
      f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} step: {shown.strip()}", flush=True)
"""


@pytest.mark.timeout(120)
def test_a_task_gets_the_cpus_per_task_that_sbatch_was_given(tmp_path):
    """sbatch --cpus-per-task=2: the task slurm/train.sh starts runs on 2 CPUs. Slurm >= 22.05 no longer passes
    sbatch's --cpus-per-task on to srun, so without slurm/train.sh passing it the step is given 1 CPU per
    task while the task still sees SLURM_CPUS_PER_TASK=2 (and the launcher sets 2 threads). This cluster
    binds tasks to their cores (task/affinity, TaskPluginParam=Cores, as production clusters do), so the
    task's CPU affinity shows what it got; `scontrol show step` shows what srun asked for per task
    (TresPerStep=cpu:N in Slurm 22.05), which holds even where binding had no effect."""
    cpus = os.cpu_count() or 1
    if cpus < 2 or os.sched_getaffinity(0) != set(range(cpus)):
        pytest.skip(f"binding 2 cores needs 2 or more CPUs, all usable here (have {sorted(os.sched_getaffinity(0))} "
                    f"of {cpus})")
    binding = SlurmCluster(bind_cores=True)
    try:
        binding.start()
    except SlurmUnavailable as exc:
        pytest.skip(str(exc))
    try:
        probe = tmp_path / "probe.py"
        probe.write_text(CPU_PROBE)
        out = tmp_path / "slurm-%j.out"
        env = {"PYTHON": sys.executable, "TRAIN_CMD": f"{sys.executable} {probe}", "CONFIG": "unused.yaml"}
        args = ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=5",
                f"--output={out}"]
        job = binding.sbatch(SCRIPT, env=env, args=args, cwd=ROOT)
        out = Path(str(out).replace("%j", job))
        info = binding.wait(job, timeout=90)
        text = out.read_text(errors="replace") if out.exists() else ""
        assert info["JobState"] == "COMPLETED", report(binding, job, out)
        (line,) = [line for line in text.splitlines() if line.startswith("probe: ")]
        assert "SLURM_CPUS_PER_TASK=2 OMP_NUM_THREADS=2 " in line, text
        assert "probe: affinity=2 " in line, text  # the task runs on 2 cores
        assert "TresPerStep=cpu:2" in line, text  # srun was given --cpus-per-task=2
        assert "threads/rank=2" in text  # the launcher's line
    finally:
        binding.cleanup()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", ["signal", "scontrol-requeue"])
def test_preempted_job_requeues_and_resumes(cluster, tmp_path, tiny_data, store, how):
    """USR1 (what --signal=USR1@120 sends before the time limit) or `scontrol requeue` (SIGTERM) mid-run,
    to every process of the step, DataLoader workers included: the ranks checkpoint and exit 75, the
    job is requeued, and the second run resumes from that checkpoint and finishes, in one MLflow run."""
    steps, log_every = 80, 4
    job, run_dir, out = submit(cluster, tmp_path, tiny_data, store, steps=steps, log_every=log_every,
                               **{"data.num_workers": 1})
    wait_for_job(cluster, job, out, lambda: logged_steps(run_dir), "logged step", timeout=120)
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


@pytest.mark.timeout(300)
def test_a_killed_rank_is_requeued_within_max_retries_and_then_fails_the_job_without_hanging(
        cluster, tmp_path, tiny_data, store):
    """SIGKILL one task's trainer once a checkpoint exists (a signal death, as a rank lost under NCCL
    ends): srun --kill-on-bad-exit ends the step and reports 128+N, and slurm/train.sh requeues the job
    (retry 1/1), which resumes from the checkpoint. Killed again, with MAX_RETRIES=1 spent, the job
    fails without a hang and the checkpoint stays for a resubmission."""
    job, run_dir, out = submit(cluster, tmp_path, tiny_data, store, steps=400, checkpoint_every=5,
                               extra_env={"MAX_RETRIES": "1"})

    def kill_rank_1() -> None:
        pids = rank_pids(run_dir).get(1, [])
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGKILL)

    def srun_codes() -> list[int]:
        return [int(c) for c in re.findall(r"srun exited with (\d+)", out.read_text(errors="replace"))]

    wait_for_job(cluster, job, out, lambda: complete_checkpoints(run_dir), "complete checkpoint", timeout=120)
    kill_rank_1()
    wait_for_job(cluster, job, out, lambda: resumed_from(out.read_text(errors="replace")),
                 "requeued run resuming", timeout=150)
    first = srun_codes()[0]
    assert first > 128, report(cluster, job, out)  # a signal death, 128+N
    text = out.read_text(errors="replace")
    assert f"requeueing job {job} (retry 1/1)" in text, report(cluster, job, out)
    (resumed,) = resumed_from(text)
    assert resumed in complete_checkpoints(run_dir)
    # the requeued run trains on; then its rank 1 is killed too: the retry budget is spent
    wait_for_job(cluster, job, out, lambda: (logged_steps(run_dir) or [0])[-1] > resumed, "step after resuming",
                 timeout=120)
    kill_rank_1()
    start = time.monotonic()
    info = cluster.wait(job, timeout=90)
    assert info["JobState"] == "FAILED" and int(info["Restarts"]) == 1, report(cluster, job, out)
    assert info["ExitCode"] != "0:0" and info["Comment"] == "disent-retries=1", report(cluster, job, out)
    assert time.monotonic() - start < 60, report(cluster, job, out)
    assert len(srun_codes()) == 2 and srun_codes()[1] > 128, report(cluster, job, out)
    assert "after 1 retries; the job fails" in out.read_text(errors="replace"), report(cluster, job, out)
    assert not (run_dir / "final").exists()
    assert complete_checkpoints(run_dir), report(cluster, job, out)


# A stand-in for `disent train` (TRAIN_CMD) that ends each attempt of the job as STUB_EXITS says, one word
# per restart: a code, or a signal the ranks die of. Every rank ends the same way, also when srun's
# SIGTERM (--kill-on-bad-exit, after the first rank's exit) reaches it first, so srun reports exactly
# that code (128+N for a signal) and the test sees slurm/train.sh's policy for it.
STUB = """\
import os, resource, signal, sys, time
restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
how = os.environ["STUB_EXITS"].split()[restart]
print(f"stub: rank {os.environ['SLURM_PROCID']} attempt {restart}: {how}", flush=True)
def end(*_):
    if how.startswith("SIG"):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        sig = getattr(signal, how)
        if sig != signal.SIGKILL:
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        time.sleep(10)
    sys.exit(int(how))
signal.signal(signal.SIGTERM, end)
end()
"""


@pytest.mark.timeout(150)
@pytest.mark.parametrize("exits, retries, state, restarts, codes", [
    # 1: a crash; requeued within the budget and the next attempt finishes
    ("1 0", "1", "COMPLETED", 1, [1, 0]),
    # 134: SIGABRT (NCCL's watchdog); requeued once, then the budget is spent and the job fails with it
    ("SIGABRT SIGABRT", "1", "FAILED", 1, [134, 134]),
    # 137: SIGKILL; MAX_RETRIES=0 fails at once
    ("SIGKILL", "0", "FAILED", 0, [137]),
    # 2: an input error; never requeued, whatever the budget
    ("2", "3", "FAILED", 0, [2]),
    # 75: preempted, requeued without counting: the 69 after it still has its one retry
    ("75 69 0", "1", "COMPLETED", 2, [75, 69, 0]),
], ids=["crash-1", "sigabrt-134", "sigkill-137-no-budget", "input-error-2", "preempted-75-not-counted"])
def test_exit_codes_policy_requeues_any_failure_but_2_and_75_within_max_retries(
        cluster, tmp_path, exits, retries, state, restarts, codes):
    """slurm/train.sh's side of the one exit-code policy (docs/faults.md): 0 done; 2 fails at once; 75 is
    requeued and not counted; any other code (69, a crash, a signal death) is requeued within MAX_RETRIES,
    counted in the job's Comment, and then fails the job with that code."""
    stub = tmp_path / "stub.py"
    stub.write_text(STUB)
    out = tmp_path / "slurm-%j.out"
    env = {"PYTHON": sys.executable, "TRAIN_CMD": f"{sys.executable} {stub}", "CONFIG": "unused.yaml",
           "STUB_EXITS": exits, "MAX_RETRIES": retries}
    job = cluster.sbatch(SCRIPT, env=env, args=[*SBATCH_ARGS, f"--output={out}"], cwd=ROOT)
    out = Path(str(out).replace("%j", job))
    info = cluster.wait(job, timeout=130)
    text = out.read_text(errors="replace") if out.exists() else ""
    assert info["JobState"] == state and int(info["Restarts"]) == restarts, report(cluster, job, out)
    assert [int(c) for c in re.findall(r"srun exited with (\d+)", text)] == codes, report(cluster, job, out)
    assert info["ExitCode"] == f"{codes[-1]}:0", report(cluster, job, out)  # the script exits with srun's code
    counted = [c for c in codes[:-1] if c != ExitCode.PREEMPTED]
    assert info.get("Comment") == (f"disent-retries={len(counted)}" if counted else None), report(cluster, job, out)
    for n in range(1, len(counted) + 1):
        assert f"requeueing job {job} (retry {n}/{retries})" in text, report(cluster, job, out)
    if state == "FAILED" and codes[-1] != ExitCode.INPUT_ERROR:
        assert f"after {retries} retries; the job fails" in text, report(cluster, job, out)
    if codes[-1] == ExitCode.INPUT_ERROR:
        assert "not requeueing" in text and "requeueing job" not in text, report(cluster, job, out)


@pytest.mark.timeout(300)
def test_a_retryable_failure_requeues_the_job_which_resumes_and_its_output_reads_well(cluster, tmp_path, tiny_data, store):
    """The training shards vanish mid-run (moved away once a checkpoint exists, back once the job has
    failed): the ranks exit 69, slurm/train.sh requeues the job (retry 1/3), and the requeued job
    resumes from its checkpoint and finishes in the same MLflow run. The output file, read as a user
    reads it: train.progress at its default (true) but stderr a file, so plain progress lines and no
    tqdm redraws, and none of the libraries' start-up warnings."""
    own = tmp_path / "data"
    shutil.copytree(tiny_data, own)
    steps, log_every = 240, 10
    job, run_dir, out = submit(cluster, tmp_path, own, store, steps=steps, log_every=log_every, checkpoint_every=10,
                               **{"train.progress": "true"})
    wait_for_job(cluster, job, out, lambda: complete_checkpoints(run_dir), "complete checkpoint", timeout=120)
    shards = sorted((own / "train").glob("shard-*.tar"))
    for shard in shards:
        shard.rename(shard.with_name(shard.name + ".away"))
    wait_for_job(cluster, job, out, lambda: "srun exited with 69" in out.read_text(errors="replace"),
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
        cluster, tmp_path, tiny_data, store):
    """`disent sweep --backend slurm`: 2 points, one array task each (1 CPU task apiece, side by side).
    Point 1 is preempted mid-run (`scontrol requeue JOB_1`) and requeued on its own; it resumes from its
    checkpoint. Both finish, each as a child of the sweep's parent MLflow run, and the last to end
    writes the summary and finishes the parent."""
    from mlflow.tracking import MlflowClient

    steps = 40
    config, *rest = train_args(tmp_path / "unused", tiny_data, steps=steps, log_every=4, tracking_uri="",
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
    wait_for_job(cluster, tasks[1], outputs[1], lambda: logged_steps(point1), "logged step of point 1", timeout=200)
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
