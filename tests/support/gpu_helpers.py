"""What the GPU tests (tests/gpu/) share: the device check, the shipped GPU config's overrides for a short run, and
a runner that starts `disent` as a user would and keeps each run's output."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SKIP_REASON = "needs a CUDA device"
GPU_CONFIG = ROOT / "configs" / "sprites_gpu.yaml"  # the shipped one-node GPU config
DEVICE = os.environ.get("DISENT_GPU_TESTS_DEVICE", "cuda")
DRY_RUN = DEVICE == "cpu"
MICRO_BATCH = 8 if DRY_RUN else 256  # per GPU, as sprites_gpu.yaml ships it (2048 over 8 GPUs)
# Dry run on CPU only (see tests/gpu/conftest.py): what makes the shipped GPU config take seconds on CPU cores.
DRY_RUN_OVERRIDES = {"model.base_channels": 8, "model.disc_channels": 8, "train.compile": "false",
                     "data.num_workers": 0, "train.channels_last": "false"} if DRY_RUN else {}


@functools.lru_cache(maxsize=1)
def cuda_devices() -> int:
    """CUDA devices a fresh process sees (0 without CUDA). Asked in a subprocess: torch caches its device
    count at first use, and this pytest process may also run CPU tests, which must not find CUDA already
    initialised here (tests/conftest.py hides the GPUs from them)."""
    import torch

    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return 0  # a CPU build of torch
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count() "
                              "if torch.cuda.is_available() else 0)"], capture_output=True, text=True, timeout=120)
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        return 0


class Runs:
    """Starts `disent` commands and keeps each one's output in OUT/logs/NAME.log."""

    def __init__(self, out: Path, data: Path):
        self.out, self.data = out, data

    def overrides(self, run_dir: Path, nproc: int = 1, **extra) -> list[str]:
        """The shipped GPU config on this machine: local shards, a local MLflow store, `nproc` GPUs at the
        shipped per-GPU micro batch, short and small evaluations; then the test's own keys."""
        values = {
            "run_dir": run_dir, "data.url": self.data, "train.device": DEVICE,
            "tracking.uri": f"sqlite:///{run_dir}/mlflow.db", "tracking.system_metrics": "false",
            "train.progress": "false", "train.global_batch_size": MICRO_BATCH * nproc, "train.log_every": 5,
            "eval.max_train_samples": 500, "eval.max_test_samples": 200, "eval.probe_epochs": 5,
            "eval.grid_size": 4, **extra, **DRY_RUN_OVERRIDES,
        }
        return [f"{k}={v}" for k, v in values.items()]

    def run(self, name: str, args: list, timeout: int, nproc: int = 1) -> subprocess.CompletedProcess:
        """`python -m disent.cli ARGS` (under torchrun when nproc > 1); the output is kept either way."""
        env = {**os.environ, "OMP_NUM_THREADS": "4", "PYTHONPATH": str(ROOT)}
        if nproc == 1:
            cmd = [sys.executable, "-m", "disent.cli", *map(str, args)]
            try:
                result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                self._keep(name, cmd, f"killed after {timeout} s", exc.stdout, exc.stderr)
                raise AssertionError(f"{name}: ran past {timeout} s; its output is in {self.log(name)}") from None
        else:
            from tests.support.train_helpers import torchrun

            cmd = ["torchrun", f"--nproc_per_node={nproc}", "-m", "disent.cli", *map(str, args)]
            try:
                result = torchrun(args, nproc=nproc, env={"OMP_NUM_THREADS": "4"}, timeout=timeout, script=None)
            except subprocess.TimeoutExpired as exc:
                self._keep(name, cmd, f"killed after {timeout} s", exc.stdout, exc.stderr)
                raise AssertionError(f"{name}: ran past {timeout} s; its output is in {self.log(name)}") from None
        self._keep(name, cmd, result.returncode, result.stdout, result.stderr)
        return result

    def log(self, name: str) -> Path:
        return self.out / "logs" / f"{name}.log"

    def _keep(self, name, cmd, code, stdout, stderr) -> None:
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")

        self.log(name).write_text(f"$ {' '.join(map(str, cmd))}\nexit: {code}\n--- stdout\n{text(stdout)}\n"
                                  f"--- stderr\n{text(stderr)}\n")


def tail(result: subprocess.CompletedProcess, n: int = 4000) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-n:]}\n--- stderr\n{result.stderr[-n:]}"


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr
