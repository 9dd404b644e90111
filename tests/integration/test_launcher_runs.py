"""`python -m launcher`: its command (dry run, refusals, exec mode) and real local / torchrun launches of the
trainer. Detection and refusals in-process: tests/unit/test_launcher.py.

The real runs start `disent train configs/base.yaml <tiny overrides>` on the session's tiny real shards and
check what the run left behind: checkpoints, metrics.jsonl, the MLflow run. Only the rank that dies before
the rendezvous is the stand-in tests/support/dist_probe.py (it needs a rank that exits before
init_process_group, which the trainer has no reason to do).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import dist_probe
from tests.support.launch_helpers import TRAIN_CMD, assert_finished, mlflow_store, slurm_step, train_args
from tests.support.processes import rank_pids, stop, wait_for
from tests.support.train_helpers import ROOT, complete_checkpoints, logged_steps, resumed_from

LAUNCHER = [sys.executable, "-m", "launcher"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return mlflow_store(tmp_path_factory)


def tracked(store: str, tmp_path: Path) -> dict:
    """This test's MLflow place: the module's store, an experiment of its own."""
    return {"tracking_uri": store, "experiment": tmp_path.name}


# --------------------------------------------------------------------------- the CLI


def launcher(*args: str, env: dict | None = None, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCHER, *args], env=launcher_env(env), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kw)


def test_cli_dry_run_in_a_slurm_step():
    result = launcher("--dry-run", "--", "true", env=slurm_step(procid=0, localid=0))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["mode"] == "slurm" and out["world_size"] == 4
    (rank,) = out["ranks"]
    assert rank["RANK"] == "0" and rank["MASTER_ADDR"] == "gpu01" and rank["OMP_NUM_THREADS"] == "6"
    assert rank["DISENT_CPUS_PER_RANK"] == "6"  # what data.num_workers=auto sizes from


def test_more_cpu_ranks_than_cores_is_warned():
    from disent.host import available_cpus

    too_many = launcher("--nproc", str(available_cpus() + 1), "--dry-run", "--", "true", env={"CUDA_VISIBLE_DEVICES": ""})
    assert too_many.returncode == 0 and f"{available_cpus() + 1} CPU ranks on {available_cpus()} usable core(s)" in \
        too_many.stderr, too_many.stderr
    enough = launcher("--nproc", "1", "--dry-run", "--", "true", env={"CUDA_VISIBLE_DEVICES": ""})
    assert "warning" not in enough.stderr


def test_cli_refusal_is_one_clear_line_and_exit_2():
    result = launcher("--nproc", "4", "--", "true", env=slurm_step(ntasks=2, nodes=1))
    assert result.returncode == 2
    assert result.stderr.startswith("launcher: error: --nproc 4 contradicts this Slurm step")
    assert "Traceback" not in result.stderr
    assert launcher().returncode == 2  # no command


def test_cli_exec_mode_becomes_the_command():
    """One rank (a Slurm task): the launcher execs, so the command has the launcher's pid."""
    code = "import os,sys; print(os.getpid(), os.getppid(), os.environ['RANK'], os.environ['WORLD_SIZE'])"
    result = launcher("--", sys.executable, "-c", code, env=slurm_step(procid=2, localid=0, nodeid=1))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[2:] == ["2", "4"]
    assert "launcher: mode=" not in result.stderr  # only rank 0 prints the topology


# --------------------------------------------------------------------------- real local runs


def launcher_env(extra: dict | None = None) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "TORCHELASTIC_", "PROBE_")) and k not in
             ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "JOB_COMPLETION_INDEX",
              "OMP_NUM_THREADS", "MKL_NUM_THREADS", "DS_ACCELERATOR")}
    clean.update(extra or {})
    return clean


def start(*args: str) -> subprocess.Popen:
    """The launcher in the background, in its own session (the test can clean up everything it started)."""
    return subprocess.Popen([*LAUNCHER, *args], env=launcher_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the launcher did not finish in {timeout}s:\n{err[-5000:]}")


@pytest.mark.timeout(120)
def test_local_two_ranks_train_together(tmp_path, tiny_data, store):
    run_dir = tmp_path / "run"
    result = launcher("--nproc", "2", "--", *TRAIN_CMD,
                      *train_args(run_dir, tiny_data, steps=6, checkpoint_every=3, **tracked(store, tmp_path)),
                      timeout=110)
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    assert result.stderr.count("launcher: mode=local world=2") == 1  # one topology line
    assert "device=CPU, gloo" in result.stderr
    assert "disent: trained 6 steps" in result.stdout
    run = assert_finished(run_dir, 6, world_size=2, **tracked(store, tmp_path))
    assert complete_checkpoints(run_dir) == [3, 6]
    assert run["tags"]["device_type"] == "cpu"


@pytest.mark.timeout(180)
def test_a_killed_rank_restarts_the_group_which_resumes(tmp_path, tiny_data, store):
    """SIGKILL one rank once a checkpoint exists: the launcher stops the other, starts the group again
    (a fresh rendezvous port), which resumes from the latest complete checkpoint and finishes."""
    run_dir, steps = tmp_path / "run", 60
    proc = start("--nproc", "2", "--max-restarts", "1", "--grace", "10", "--", *TRAIN_CMD,
                 *train_args(run_dir, tiny_data, steps=steps, log_every=4, checkpoint_every=10,
                             **tracked(store, tmp_path)))
    try:
        wait_for(lambda: complete_checkpoints(run_dir), 90, "complete checkpoint", proc)
        pids = rank_pids(run_dir).get(1, [])
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGKILL)
        killed_after = complete_checkpoints(run_dir)[-1]
        out, err = finish(proc, 150)
    finally:
        stop(proc)
    assert proc.returncode == 0, err[-6000:]
    assert "local rank 1 exited with code 137" in err and "restarting (1/1)" in err, err[-6000:]
    (resumed,) = resumed_from(err)  # only the second attempt resumed
    assert killed_after <= resumed < steps and resumed % 10 == 0, (killed_after, resumed)
    assert_finished(run_dir, steps, world_size=2, log_every=4, repeats=True, **tracked(store, tmp_path))
    logged = logged_steps(run_dir)
    assert all(logged.count(s) <= 2 for s in logged)  # at most the steps after `resumed` twice
    assert [s for s in logged if s <= resumed] == list(range(4, resumed + 1, 4))  # not retrained from 0


@pytest.mark.timeout(120)
def test_a_dead_rank_takes_the_group_down_without_hanging(tmp_path):
    # Rank 1 dies before the rendezvous: rank 0 would wait in init_process_group for its timeout.
    # The stand-in: the trainer has no reason to exit before joining the group.
    start_t = time.monotonic()
    run_dir = tmp_path / "run"
    result = launcher("--nproc", "2", "--grace", "3", "--", *dist_probe.TRAIN_CMD,
                      *dist_probe.train_args(run_dir, 8, 2), env={"PROBE_CRASH": "1:init", "PROBE_TIMEOUT": "600"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert time.monotonic() - start_t < 60
    assert "local rank 1 exited with code 1" in result.stderr and "killing them" in result.stderr


# A rank that ignores SIGTERM; with STOP_CLEANLY=<local rank>, that rank exits 75 on SIGTERM instead.
STUBBORN_RANK = (
    "import os, signal, sys, time\n"
    "mine = os.environ['LOCAL_RANK'] == os.environ.get('STOP_CLEANLY')\n"
    "signal.signal(signal.SIGTERM, (lambda *a: sys.exit(75)) if mine else signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(120)\n"
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stop_cleanly", ["", "0"])
def test_a_group_killed_after_its_grace_never_exits_0_or_75(stop_cleanly):
    """SIGTERM to the launcher; a rank ignores it and is killed --grace seconds later. The training did not finish,
    so the exit is the kill's 137 (retried), never 0 (the pod would be Succeeded) and never 75 (only when every rank
    stopped by itself): neither alone nor beside a rank that did exit 75."""
    proc = subprocess.Popen([*LAUNCHER, "--nproc", "2", "--grace", "2", "--", sys.executable, "-c", STUBBORN_RANK],
                            env=launcher_env({"STOP_CLEANLY": stop_cleanly}), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for _ in range(2):
        assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 137, err
    assert "killing them" in err and "exit 137" in err


def signalled_after_a_logged_step(args: list[str], run_dir: Path, sig: int) -> tuple[subprocess.Popen, str]:
    """The launcher with `args`, sent `sig` once the run has logged a step; it and its stderr once it has ended."""
    proc = start(*args)
    try:
        wait_for(lambda: logged_steps(run_dir), 90, "logged step", proc)
        proc.send_signal(sig)
        _, err = finish(proc, 90)
    finally:
        stop(proc)
    return proc, err


@pytest.mark.timeout(180)
def test_preemption_signal_exits_75_and_the_next_run_resumes(tmp_path, tiny_data, store):
    """SIGTERM to the launcher (what Kubernetes sends a pod; SIGUSR1 is forwarded the same way and is
    covered under Slurm): every rank finishes its step, checkpoints, exits 75; the launcher exits 75.
    The same command again resumes from that checkpoint, in the same MLflow run, and finishes."""
    run_dir, steps = tmp_path / "run", 60
    args = ["--nproc", "2", "--", *TRAIN_CMD, *train_args(run_dir, tiny_data, steps=steps, **tracked(store, tmp_path))]
    proc, err = signalled_after_a_logged_step(args, run_dir, signal.SIGTERM)
    assert proc.returncode == 75, err[-6000:]
    assert "exit 75 so the job is requeued" in err
    (stopped,) = complete_checkpoints(run_dir)  # the stop checkpoint only
    assert 2 <= stopped < steps and f"preempted at step {stopped}" in err, err[-4000:]
    assert not (run_dir / "final").exists()

    result = launcher(*args, timeout=110)  # the requeued run
    assert result.returncode == 0, result.stderr[-6000:]
    assert resumed_from(result.stderr) == [stopped]
    # metrics continue from the stop (no step twice), in the one MLflow run
    assert_finished(run_dir, steps, world_size=2, **tracked(store, tmp_path))


@pytest.mark.timeout(120)
def test_ctrl_c_to_the_launcher_checkpoints_every_rank_and_exits_130(tmp_path, tiny_data, store):
    """Ctrl-C in the launcher's terminal: it forwards SIGINT to the ranks (each in its own session), every rank
    finishes its step, checkpoints and exits 130, and so does the launcher, with no traceback."""
    run_dir = tmp_path / "run"
    args = ["--nproc", "2", "--", *TRAIN_CMD, *train_args(run_dir, tiny_data, steps=60, **tracked(store, tmp_path))]
    proc, err = signalled_after_a_logged_step(args, run_dir, signal.SIGINT)
    assert proc.returncode == 130, err[-6000:]
    assert err.count("exiting with 130") == 2 and "Traceback" not in err, err[-6000:]
    assert len(complete_checkpoints(run_dir)) == 1


@pytest.mark.timeout(150)
@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed")
def test_under_torchrun_the_launcher_uses_its_variables(tmp_path, tiny_data, store):
    """`torchrun ... -m launcher -- disent train`: each worker's launcher sees torchrun's variables and execs."""
    run_dir = tmp_path / "run"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--nproc-per-node", "2", "--monitor-interval", "0.5",
           "-m", "launcher", "--", *TRAIN_CMD, *train_args(run_dir, tiny_data, steps=4, **tracked(store, tmp_path))]
    code, out = run_bounded(cmd, launcher_env(), timeout=130)
    assert code == 0, out[-5000:]
    assert out.count("launcher: mode=torchrun world=2") == 1
    assert_finished(run_dir, 4, world_size=2, **tracked(store, tmp_path))


def run_bounded(cmd: list[str], env: dict, timeout: float) -> tuple[int, str]:
    """Run in a new session; on timeout kill the whole session so no worker outlives the test."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd[0]} did not finish in {timeout}s:\n{out[-5000:]}")
    return proc.returncode, out
