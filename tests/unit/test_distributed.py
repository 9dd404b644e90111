"""Where a rank runs and how the ranks agree (disent/train/distributed.py), in-process: the device decision told
to DeepSpeed, the process group bound to this rank's own GPU, determinism per device, rank 0's choice of
checkpoint, when the ranks agree on a stop, and the version floors the code needs. The CPU control group on
real 2-process gloo groups and the optimizer DeepSpeed builds on GPU:
tests/integration/test_distributed_processes.py."""
from __future__ import annotations

import os
import re
import tomllib
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from disent.config import ConfigError, load_config
from disent.train import distributed
from disent.train.distributed import DistEnv, apply_determinism, choose_device, init_distributed
from tests.support.train_helpers import ROOT


@pytest.fixture
def gpus(monkeypatch):
    """torch believes it sees `count` GPUs (set the count on the returned object)."""
    seen = SimpleNamespace(count=1, set_device=[])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: seen.count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: seen.count)
    monkeypatch.setattr(torch.cuda, "set_device", seen.set_device.append)
    return seen


@pytest.mark.parametrize("requested, visible, chosen", [("auto", 0, "cpu"), ("auto", 2, "cuda"), ("cpu", 2, "cpu"),
                                                         ("cuda", 1, "cuda")])
def test_train_device_is_one_decision(gpus, requested, visible, chosen):
    gpus.count = visible
    assert choose_device(requested) == chosen


def test_train_device_cuda_without_a_gpu_is_an_input_error(gpus):
    gpus.count = 0
    with pytest.raises(ConfigError, match="train.device=cuda, but torch .* sees no CUDA device"):
        choose_device("cuda")


def test_deepspeed_is_told_the_device_chosen_even_over_an_inherited_ds_accelerator(monkeypatch):
    """Defect: `make demo`/`make test` exported DS_ACCELERATOR=cpu while the trainer put batches on CUDA."""
    from deepspeed.accelerator import real_accelerator

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setattr(real_accelerator, "ds_accelerator", None)
    distributed.use_accelerator("cuda")
    assert os.environ["DS_ACCELERATOR"] == "cuda"
    monkeypatch.setattr(real_accelerator, "ds_accelerator", SimpleNamespace(device_name=lambda: "cpu"))
    with pytest.raises(ConfigError, match="DeepSpeed already runs on cpu in this process, but train.device chose cuda"):
        distributed.use_accelerator("cuda")


@pytest.mark.parametrize("local_rank, visible, index", [(3, 1, 0), (3, 8, 3), (0, 1, 0)])
def test_the_process_group_is_bound_to_the_gpu_this_rank_sees(gpus, monkeypatch, local_rank, visible, index):
    """Defect: DeepSpeed 0.19 passes device_id=cuda:LOCAL_RANK; a Slurm task bound to its own GPU has LOCAL_RANK 3
    and one device, and torch refuses cuda:3. The group is now made here, on this rank's device, with the
    configured timeout, and DeepSpeed adopts it."""
    gpus.count = visible
    calls = {}
    monkeypatch.setattr(distributed, "use_accelerator", lambda device_type: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.update(backend=backend, **kw))
    monkeypatch.setattr(dist, "new_group", lambda **kw: calls.update(control=kw) or "control")
    import deepspeed

    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: calls.update(deepspeed=kw))
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "unset")  # restored (to absent) after the test
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING")
    env = DistEnv(rank=local_rank, world_size=8, local_rank=local_rank, device_type="cuda")
    try:
        init_distributed(env, timeout_s=123)
    finally:
        distributed._CONTROL.group = None
    assert calls["backend"] == "nccl" and calls["device_id"] == torch.device("cuda", index)
    assert gpus.set_device == [index] and calls["timeout"] == timedelta(seconds=123)
    assert calls["deepspeed"]["dist_backend"] == "nccl" and calls["control"]["backend"] == "gloo"
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"  # a lost peer raises (exit 69), no SIGABRT


def test_determinism_follows_the_device_unless_set(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "unset")  # restored (to absent) after the test
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    try:
        assert apply_determinism("auto", "cpu") and torch.are_deterministic_algorithms_enabled()
        assert not apply_determinism("auto", "cuda") and not torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        assert apply_determinism(True, "cuda") and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert not apply_determinism(False, "cpu") and not torch.are_deterministic_algorithms_enabled()
    finally:
        apply_determinism("auto", "cpu")


# --------------------------------------------------------------------------- what the ranks agree on


def test_rank_zero_chooses_the_checkpoint_every_rank_resumes(monkeypatch, tmp_path):
    """Each rank listing run_dir itself can see different latest checkpoints on NFS; the trainer takes rank 0's."""
    from disent.checkpoint import CheckpointManager
    from disent.train.trainer import Trainer

    def info(step):
        path = tmp_path / f"step-{step}"
        return SimpleNamespace(path=path, step=step)

    restored = []
    monkeypatch.setattr(distributed, "_world", lambda: 2)
    monkeypatch.setattr(CheckpointManager, "resolve", staticmethod(lambda path: info(int(str(path).rsplit("-", 1)[1]))))
    import disent.train.trainer as trainer_module

    for rank, sees, broadcast in ((0, 40, None), (1, 30, str(tmp_path / "step-40"))):
        monkeypatch.setattr(trainer_module, "from_rank_zero", lambda value, b=broadcast: value if b is None else b)
        me = SimpleNamespace(env=DistEnv(rank=rank, world_size=2), checkpoints=SimpleNamespace(
            latest_complete=lambda s=sees: info(s)), restore=lambda i: restored.append(i.step) or {})
        Trainer._resume(me, None, auto_resume=True)
    assert restored == [40, 40]


@pytest.mark.parametrize("step, checked", [(10, True), (11, False), (12, True), (15, True), (13, False)])
def test_ranks_agree_on_a_stop_only_at_check_log_and_checkpoint_steps(monkeypatch, step, checked):
    """A host read per step would keep the CPU from running ahead of the GPU."""
    from disent.train.trainer import Trainer

    import disent.train.trainer as trainer_module

    asked = []
    monkeypatch.setattr(trainer_module, "agree_any", lambda flag: asked.append(flag) or flag)
    cfg = load_config(ROOT / "configs" / "base.yaml", ["train.stop_check_every=10", "train.log_every=4",
                                                       "train.checkpoint_every=15"])
    me = SimpleNamespace(step=step, cfg=cfg, preemption=SimpleNamespace(raised=True))
    assert Trainer._stop_agreed(me) is checked and len(asked) == int(checked)


# --------------------------------------------------------------------------- versions


def _floor(requirement: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.search(r">=([\d.]+)", requirement).group(1).split("."))


def test_the_version_floors_admit_only_what_the_code_uses():
    """bf16 relies on DeepSpeed's torch_autocast key (0.17.2); checkpoints load under torch.serialization.safe_globals
    (torch 2.5). Below those, bf16 trained silently in fp32 and loading failed."""
    deps = {re.split(r"[<>=\[ ]", d, maxsplit=1)[0]: d
            for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert _floor(deps["deepspeed"]) >= (0, 17, 2) and _floor(deps["torch"]) >= (2, 5)
    assert hasattr(torch.serialization, "safe_globals")


def test_an_nccl_failure_is_a_lost_peer_and_so_exit_69():
    """Under NCCL with CleanUpOnly error handling, a dead peer or a timed-out collective raises DistBackendError."""
    from disent.train.distributed import is_lost_peer

    assert is_lost_peer(dist.DistBackendError("NCCL communicator was aborted on rank 1"))
    assert is_lost_peer(RuntimeError("[Rank 0]: Rank 1 failed to pass monitoredBarrier in 2000 ms (timed out)"))
    assert not is_lost_peer(ValueError("bad value"))
