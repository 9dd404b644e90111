"""The ranks' agreements in processes of their own: the CPU control group on 2 real gloo ranks (agree, broadcast,
wait for rank 0 with a bound), and the optimizer DeepSpeed builds for the GPU config, in its own process. The
rest of disent/train/distributed.py in-process: tests/unit/test_distributed.py."""
from __future__ import annotations

import os
import time
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp

from disent import process_group
from disent.config import load_config
from disent.host import free_port
from disent.train import distributed
from tests.support.train_helpers import ROOT


# --------------------------------------------------------------------------- the control group, 2 real ranks


def _control_worker(rank: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    distributed._CONTROL.group = dist.new_group(backend="gloo")
    try:
        out = {"any": distributed.agree_any(rank == 1), "none": distributed.agree_any(False),
               "choice": process_group.from_rank_zero(f"step-{rank}")}
        if rank == 0:
            time.sleep(3)  # an evaluation longer than nothing, shorter than the wait allowed
        started = time.monotonic()
        distributed.wait_for_rank_zero(timeout_s=30)
        out["waited"] = time.monotonic() - started
        try:
            if rank == 1:
                distributed.wait_for_rank_zero(timeout_s=2)  # rank 0 never comes: it fails, it does not hang
            else:
                time.sleep(5)
            out["late"] = "passed"
        except RuntimeError as exc:
            out["late"] = f"raised, lost peer: {distributed.is_lost_peer(exc)}"
        results[rank] = out
    finally:
        distributed._CONTROL.group = None
        dist.destroy_process_group()


def test_the_control_group_agrees_broadcasts_and_waits_for_rank_zero_with_a_bound():
    results = mp.Manager().dict()
    mp.spawn(_control_worker, args=(free_port(), results), nprocs=2, join=True)
    zero, one = results[0], results[1]
    assert zero["any"] and one["any"] and not zero["none"] and not one["none"]
    assert zero["choice"] == one["choice"] == "step-0"
    assert one["waited"] > 2  # rank 1 waited for rank 0's "evaluation"
    assert one["late"] == "raised, lost peer: True"


def _long_evaluation_worker(rank: int, port: int, results):
    """The groups as training makes them, with a collective timeout (2 s) far below the evaluation's (30 s)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=2))
    distributed.make_control_groups("gloo", timeout_s=2, wait_timeout_s=30)
    try:
        if rank == 0:
            time.sleep(5)  # rank 0's evaluation: longer than the collective timeout, within the evaluation's
        started = time.monotonic()
        try:
            distributed.wait_for_rank_zero(timeout_s=30)
            results[rank] = time.monotonic() - started
        except RuntimeError as exc:
            results[rank] = f"gave up after {time.monotonic() - started:.1f}s: {exc}"
    finally:
        distributed.shutdown_distributed()


def test_the_other_ranks_wait_for_rank_zeros_evaluation_with_its_timeout_not_the_collective_one():
    """Defect: in gloo's monitored_barrier every rank but 0 waits with its group's timeout; on the control group
    that was train.collective_timeout_s, so an evaluation longer than it made every other rank exit 69."""
    results = mp.Manager().dict()
    mp.spawn(_long_evaluation_worker, args=(free_port(), results), nprocs=2, join=True)
    assert isinstance(results[1], float) and results[1] > 4, results[1]


# --------------------------------------------------------------------------- optimizer


_ENGINE_ON_CPU = """
import json, sys
import deepspeed, deepspeed.ops.adam as ds_adam, torch
from disent.train.distributed import DistEnv, init_distributed, shutdown_distributed


def no_build(*a, **k):
    raise AssertionError("DeepSpeed's FusedAdam was built")

ds_adam.FusedAdam = no_build
init_distributed(DistEnv())
model = torch.nn.Linear(4, 2)
engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=json.loads(sys.argv[1]))
print(json.dumps({"type": type(engine.basic_optimizer).__name__, "fused": engine.basic_optimizer.defaults["fused"]}))
shutdown_distributed()
"""


def test_on_gpu_the_optimizer_is_torchs_fused_adamw_and_nothing_is_compiled():
    """Defect: DeepSpeed's FusedAdam was JIT-built with nvcc at the first GPU start, under a lock every rank waits on.
    Built on CPU from the GPU config's optimizer section (torch's fused AdamW runs on CPU too), in its own process:
    DeepSpeed keeps process-wide state (its groups) that later tests must not inherit."""
    import json
    import subprocess
    import sys

    from disent.train.ds_config import deepspeed_config

    cfg = load_config(ROOT / "configs" / "base.yaml", ["data.url=x"])
    gpu = deepspeed_config(cfg, "vae", 1, "cuda")
    assert gpu["optimizer"]["params"]["torch_adam"] is True and gpu["optimizer"]["params"]["fused"] is True
    assert "fused" not in deepspeed_config(cfg, "vae", 1, "cpu")["optimizer"]["params"]
    result = subprocess.run([sys.executable, "-c", _ENGINE_ON_CPU, json.dumps(gpu)], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"type": "AdamW", "fused": True}
