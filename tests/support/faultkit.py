"""Helpers for the fault-injection suite (tests/faults/): real launches of `disent train` under the
launcher, waiting for their end, comparing final weights, the MLflow runs of a store. Waiting, finding rank
processes and stopping a launch: tests/support/processes.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.support.processes import stop
from tests.support.train_helpers import ROOT, tiny_overrides

BASE = "configs/base.yaml"
LAUNCHER = [sys.executable, "-m", "launcher"]
TRAIN = [sys.executable, "-m", "disent.cli", "train", BASE]
# Long enough to interrupt (~10 s of steps on 2 loaded cores), checkpoints every 20 steps.
RESTART_RUN = {"train.steps": 240, "train.checkpoint_every": 20, "train.log_every": 10, "train.keep_checkpoints": 2}


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
           and not k.startswith(("SLURM_", "MLFLOW_", "DISENT_FAULT"))}
    env.update({"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def launch(run_dir: Path, data, *, extra: dict | None = None, nproc: int = 2, max_restarts: int = 0,
           grace: float = 15, env: dict | None = None, log_name: str = "launcher.log") -> tuple[subprocess.Popen, Path]:
    """`python -m launcher --nproc N ... -- python -m disent.cli train base.yaml <tiny overrides>`, in the
    background; output (launcher and ranks) goes to run_dir/../<log_name>."""
    run_dir = Path(run_dir)
    log_path = run_dir.parent / log_name
    cmd = [*LAUNCHER, "--nproc", str(nproc), "--max-restarts", str(max_restarts), "--grace", str(grace), "--",
           *TRAIN, *tiny_overrides(run_dir, data, **(extra or {}))]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=base_env(**(env or {})), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    return proc, log_path


def finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise AssertionError(f"the job did not end within {timeout:.0f}s") from None


def final_weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: torch.load(Path(run_dir) / "final" / f"{name}.pt", weights_only=True) for name in ("vae", "disc")}


def assert_same_weights(a: dict, b: dict) -> None:
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        different = [k for k in a[name] if not torch.equal(a[name][k], b[name][k])]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"


def mlflow_runs(uri: str, experiment: str = "disent"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, ([] if exp is None else client.search_runs([exp.experiment_id]))
