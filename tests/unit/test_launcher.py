"""launcher/: environment detection (Slurm step, torchrun worker, Kubernetes pod, local), node-list parsing and
the refusals of contradicting settings, in-process. The launcher's command and its real launches of the
trainer: tests/integration/test_launcher_runs.py."""
from __future__ import annotations

import pytest

from launcher.topology import (
    LaunchError,
    expand_nodelist,
    expand_tasks_per_node,
    resolve,
    slurm_master_port,
)
from tests.support.launch_helpers import k8s_pod, slurm_step


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
