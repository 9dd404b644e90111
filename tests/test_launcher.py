"""launcher/: environment detection, refusals, and real local / torchrun launches of a gloo program.

The launched program is dist_probe.TRAIN_CMD (the trainer's stand-in; see tests/dist_probe.py).
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

from dist_probe import TRAIN_CMD, complete_checkpoints, current_step, read_done, read_starts, train_args
from launcher.topology import (
    LaunchError,
    expand_nodelist,
    expand_tasks_per_node,
    resolve,
    slurm_master_port,
)

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = [sys.executable, "-m", "launcher"]

# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("nodelist, expected", [
    ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
    ("node7", ["node7"]),
    ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
    ("node-[008-010]-ib", ["node-008-ib", "node-009-ib", "node-010-ib"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
    ("gpu[9-11]", ["gpu9", "gpu10", "gpu11"]),
    ("x[3]", ["x3"]),
])
def test_expand_nodelist(nodelist, expected):
    assert expand_nodelist(nodelist) == expected


@pytest.mark.parametrize("bad", ["gpu[01-04", "gpu01]", "gpu[4-1]", "gpu[a-b]", ""])
def test_expand_nodelist_refuses_garbage(bad):
    with pytest.raises(LaunchError):
        expand_nodelist(bad)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]
    with pytest.raises(LaunchError):
        expand_tasks_per_node("2(x)")


def test_slurm_port_from_job_id():
    assert slurm_master_port("123") == 12123
    assert slurm_master_port("20005") == 12005
    assert 12000 <= slurm_master_port("4242_7") < 32000  # array job ids


# --------------------------------------------------------------------------- resolution


def slurm_step(procid=1, ntasks=4, localid=1, nodeid=0, nodes=2, nodelist="gpu[01-02]", **extra):
    env = {
        "SLURM_JOB_ID": "4321", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid),
        "SLURM_NTASKS": str(ntasks), "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_LOCALID": str(localid),
        "SLURM_NODEID": str(nodeid), "SLURM_NNODES": str(nodes), "SLURM_STEP_NUM_NODES": str(nodes),
        "SLURM_JOB_NODELIST": nodelist, "SLURM_STEP_NODELIST": nodelist,
        "SLURM_STEP_TASKS_PER_NODE": f"{ntasks // nodes}(x{nodes})", "SLURM_CPUS_PER_TASK": "6",
    }
    env.update(extra)
    return env


def k8s_pod(index=1, nnodes=2, **extra):
    env = {"JOB_COMPLETION_INDEX": str(index), "DISENT_NNODES": str(nnodes), "DISENT_SERVICE": "disent",
           "DISENT_JOB_NAME": "disent-train", "HOSTNAME": f"disent-train-{index}", "MASTER_PORT": "29500"}
    env.update(extra)
    return env


def test_slurm_step():
    t = resolve(slurm_step(procid=3, localid=1, nodeid=1))
    assert (t.mode, t.spawn, t.world_size, t.nnodes, t.node_rank, t.nproc_per_node) == ("slurm", False, 4, 2, 1, 2)
    env = t.rank_env()
    assert env["RANK"] == "3" and env["LOCAL_RANK"] == "1" and env["WORLD_SIZE"] == "4"
    assert env["MASTER_ADDR"] == "gpu01" and env["MASTER_PORT"] == str(12000 + 4321)
    assert t.threads_per_rank == 6
    assert resolve(slurm_step(MASTER_PORT="40000")).master_port == 40000  # set: used as is
    assert resolve(slurm_step(RANK="1", WORLD_SIZE="4")).rank == 1  # agreeing leftovers are fine


def test_torchrun_worker():
    env = {"TORCHELASTIC_RUN_ID": "x", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
           "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "29400"}
    t = resolve(env)
    assert (t.mode, t.spawn, t.rank, t.node_rank, t.nnodes) == ("torchrun", False, 5, 1, 2)
    assert t.rank_env()["MASTER_ADDR"] == "h0"
    # torchrun started by srun (one agent per node) is fine: torchrun's variables win.
    assert resolve({**slurm_step(), **env}).mode == "torchrun"


def test_kubernetes_pod():
    t = resolve(k8s_pod(index=1, DISENT_NPROC_PER_NODE="4"))
    assert (t.mode, t.spawn, t.world_size, t.node_rank) == ("kubernetes", True, 8, 1)
    assert t.master_addr == "disent-train-0.disent" and t.master_port == 29500
    assert t.rank_env(local_rank=3, master_port=29500)["RANK"] == "7"
    single = resolve(k8s_pod(index=1, DISENT_JOB_NAME=""))  # job name from HOSTNAME; 1 rank per pod
    assert single.master_addr == "disent-train-0.disent" and not single.spawn and single.rank == 1


def test_local():
    t = resolve({}, nproc=3)
    assert (t.mode, t.spawn, t.world_size, t.master_port) == ("local", True, 3, None)
    assert resolve({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}).mode == "local"  # 1-task batch script


@pytest.mark.parametrize("env, kwargs, words", [
    (slurm_step(ntasks=2, nodes=1), {"nproc": 4}, "--nproc 4 contradicts this Slurm step"),
    ({"RANK": "0"}, {}, "WORLD_SIZE is not"),
    ({"WORLD_SIZE": "2"}, {}, "RANK is not"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, {}, "RANK=2 must be < WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, {"nproc": 2}, "--nproc 2 would"),
    ({**slurm_step(), **k8s_pod()}, {}, "both Slurm"),
    (slurm_step(RANK="0"), {}, "RANK=0 contradicts SLURM_PROCID"),
    (slurm_step(WORLD_SIZE="8"), {}, "WORLD_SIZE=8 contradicts"),
    (slurm_step(MASTER_ADDR="elsewhere"), {}, "MASTER_ADDR=elsewhere contradicts"),
    (slurm_step(procid=4), {}, "SLURM_PROCID=4 must be <"),
    (slurm_step(), {"max_restarts": 2}, "requeue"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}, {}, "not a job step"),
    (k8s_pod(DISENT_SERVICE=""), {}, "DISENT_SERVICE"),
    (k8s_pod(index=2), {}, "JOB_COMPLETION_INDEX=2 must be < DISENT_NNODES=2"),
    (k8s_pod(HOSTNAME="other-1"), {}, "HOSTNAME='other-1'"),
    (k8s_pod(RANK="1"), {}, "RANK is set"),
    (k8s_pod(DISENT_NPROC_PER_NODE="8"), {"nproc": 4}, "--nproc 4 contradicts DISENT_NPROC_PER_NODE=8"),
    ({"TORCHELASTIC_RUN_ID": "x", "RANK": "0"}, {}, "WORLD_SIZE"),
    ({}, {"nproc": 0}, "--nproc must be >= 1"),
    ({"MASTER_PORT": "70000"}, {}, "not a TCP port"),
])
def test_contradictions_are_refused(env, kwargs, words):
    with pytest.raises(LaunchError) as info:
        resolve(env, **kwargs)
    assert words in str(info.value)


# --------------------------------------------------------------------------- the CLI


def launcher(*args: str, env: dict | None = None, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "TORCHELASTIC_", "PROBE_")) and k not in
             ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "JOB_COMPLETION_INDEX",
              "OMP_NUM_THREADS", "MKL_NUM_THREADS", "DS_ACCELERATOR")}
    clean.update(env or {})
    return subprocess.run([*LAUNCHER, *args], env=clean, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, **kw)


def test_cli_dry_run_in_a_slurm_step():
    result = launcher("--dry-run", "--", "true", env=slurm_step(procid=0, localid=0))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["mode"] == "slurm" and out["world_size"] == 4
    (rank,) = out["ranks"]
    assert rank["RANK"] == "0" and rank["MASTER_ADDR"] == "gpu01" and rank["OMP_NUM_THREADS"] == "6"


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


def probe(run_dir: Path, steps: int, *launcher_args: str, env: dict | None = None, checkpoint_every: int = 2,
          timeout: float = 120) -> subprocess.CompletedProcess:
    return launcher(*launcher_args, "--", *TRAIN_CMD, *train_args(run_dir, steps, checkpoint_every),
                    env=env, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_local_two_ranks_train_together(tmp_path):
    run_dir = tmp_path / "run"
    result = probe(run_dir, 6, "--nproc", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.count("launcher: mode=local world=2") == 1  # one topology line
    done = read_done(run_dir)
    assert done["world_size"] == 2 and done["total"] == 12.0
    starts = read_starts(run_dir)
    assert sorted(s["rank"] for s in starts) == [0, 1]
    cores = len(os.sched_getaffinity(0))
    for s in starts:
        assert s["mode"] == "local" and s["master"].startswith("127.0.0.1:")
        assert s["omp_threads"] == str(max(1, cores // 2)) and s["ds_accelerator"] == "cpu"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_failed_rank_restarts_the_group_which_resumes(tmp_path):
    run_dir = tmp_path / "run"
    result = probe(run_dir, 8, "--nproc", "2", "--max-restarts", "1", env={"PROBE_CRASH": "1:5"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "restarting (1/1)" in result.stderr
    starts = read_starts(run_dir)
    assert len(starts) == 4 and sorted({s["resumed_from"] for s in starts}) == [0, 4], starts
    ports = {s["master"] for s in starts}
    assert len(ports) == 2  # a fresh rendezvous port per attempt
    assert read_done(run_dir)["total"] == 16.0  # state carried over the restart


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_dead_rank_takes_the_group_down_without_hanging(tmp_path):
    # Rank 1 dies before the rendezvous: rank 0 would wait in init_process_group for its timeout.
    start = time.monotonic()
    result = probe(tmp_path / "run", 8, "--nproc", "2", "--grace", "3",
                   env={"PROBE_CRASH": "1:init", "PROBE_TIMEOUT": "600"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert time.monotonic() - start < 60
    assert "local rank 1 exited with code 1" in result.stderr and "killing them" in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_preemption_signal_exits_75_and_the_next_run_resumes(tmp_path, sig):
    run_dir, steps = tmp_path / "run", 200
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PROBE_"))}
    clean.update(PROBE_STEP_TIME="0.1")
    proc = subprocess.Popen([*LAUNCHER, "--nproc", "2", "--", *TRAIN_CMD, *train_args(run_dir, steps, 1000)],
                            env=clean, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while current_step(run_dir) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, out + err
    stopped = complete_checkpoints(run_dir)
    assert len(stopped) == 1 and 3 <= stopped[0] < steps  # the stop checkpoint

    result = probe(run_dir, stopped[0] + 3, "--nproc", "2")  # the requeued run, a few steps more
    assert result.returncode == 0, result.stdout + result.stderr
    assert {s["resumed_from"] for s in read_starts(run_dir)[2:]} == {stopped[0]}
    assert read_done(run_dir)["total"] == 2.0 * (stopped[0] + 3)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed")
def test_under_torchrun_the_launcher_uses_its_variables(tmp_path):
    """`torchrun ... -m launcher -- CMD`: each worker's launcher sees torchrun's variables and execs."""
    run_dir = tmp_path / "run"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PROBE_"))}
    cmd = [torchrun, "--nproc-per-node", "2", "--monitor-interval", "0.5",
           "-m", "launcher", "--", *TRAIN_CMD, *train_args(run_dir, 4, 2)]
    code, out = run_bounded(cmd, env, timeout=150)
    assert code == 0, out[-5000:]
    starts = read_starts(run_dir)
    assert {s["mode"] for s in starts} == {"torchrun"} and sorted(s["rank"] for s in starts) == [0, 1]
    assert read_done(run_dir)["total"] == 8.0
    assert out.count("launcher: mode=torchrun world=2") == 1


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
