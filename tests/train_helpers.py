"""Helpers for the training tests: tiny configs, an in-memory pair loader, a torchrun wrapper.

`FakePairLoader` has PairLoader's interface (disent/data/stream.py) and is deterministic from
(seed, rank, batch index), so its state is one integer. Tests pick it by running
`tests/train_worker.py` under torchrun; the real loader goes through `disent train`.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "train_worker.py"


class FakePairLoader:
    """Synthetic same-class pairs: class c lights up row band c; the rest is noise."""

    def __init__(self, data_cfg, split, batch_size, rank, world_size, seed):
        self.cfg = data_cfg
        self.split = split
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.position = 0
        self.wait_seconds = 0.0
        self.skipped_shards = 0

    def _images(self, gen: torch.Generator, labels: torch.Tensor) -> torch.Tensor:
        c, s = self.cfg.channels, self.cfg.image_size
        images = torch.randint(0, 60, (len(labels), c, s, s), generator=gen, dtype=torch.uint8)
        band = max(1, s // self.cfg.num_classes)
        for i, y in enumerate(labels.tolist()):
            start = (y * band) % s
            images[i, :, start : start + band, :] = 230
        return images

    def _batch(self, index: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.rank) * 1_000_003 + index) % 2**63)
        b, k = self.batch_size, self.cfg.num_classes
        y1 = torch.randint(0, k, (b,), generator=gen)
        y2 = torch.randint(0, k, (b,), generator=gen)
        return {
            "x1": self._images(gen, y1),
            "x1p": self._images(gen, y1),
            "x2": self._images(gen, y2),
            "x2p": self._images(gen, y2),
            "y1": y1,
            "y2": y2,
            "f1": torch.rand(b, 4, generator=gen),
            "f2": torch.rand(b, 4, generator=gen),
        }

    def __iter__(self):
        while True:
            start = time.perf_counter()
            batch = self._batch(self.position)
            self.position += 1
            self.wait_seconds += time.perf_counter() - start
            yield batch

    def state_dict(self) -> dict:
        return {"position": self.position, "split": self.split}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

    def close(self) -> None:
        pass


def make_tiny_data(out: Path, samples: int = 600, classes: int = 4, seed: int = 0) -> Path:
    """Real shards via `disent prepare npz:...`: 28x28x1 images, class c lights up row band c."""
    import numpy as np

    from disent.cli import main as disent_main

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, samples)
    images = rng.integers(0, 60, (samples, 28, 28), dtype=np.uint8)
    band = 28 // classes
    for i, y in enumerate(labels):
        images[i, y * band : (y + 1) * band, :] = 230
    np.savez(out / "tiny.npz", images=images, labels=labels)
    data = out / "shards"
    rc = disent_main(["prepare", f"npz:{out / 'tiny.npz'}", str(data), "--no-progress", "--groups-per-shard", "20",
                      "--overwrite", "--seed", str(seed)])
    assert rc == 0
    return data


def tiny_overrides(run_dir, data_url=None, **extra) -> list[str]:
    """Overrides for a tiny, fast run (28x28x1, 4 classes, 8 base channels, batch 8)."""
    values = {
        "name": "tiny",
        "run_dir": str(run_dir),
        "data.url": str(data_url or Path(run_dir) / "no-data"),
        "data.num_workers": 0,
        "data.image_size": 28,
        "data.channels": 1,
        "data.num_classes": 4,
        "model.s_dim": 4,
        "model.z_dim": 4,
        "model.base_channels": 8,
        "model.disc_channels": 8,
        "train.global_batch_size": 8,
        "train.steps": 6,
        "train.log_every": 2,
        "train.eval_every": 1000,
        "eval.max_train_samples": 200,
        "eval.max_test_samples": 100,
        "eval.probe_epochs": 1,
        "eval.grid_size": 4,
        "train.checkpoint_every": 3,
        "train.progress": False,
        "tracking.uri": f"sqlite:///{run_dir}/mlflow.db",
        "tracking.system_metrics": False,
        "tracking.run_name": "tiny",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args, nproc=2, env=None, timeout=300, script=WORKER, cwd=ROOT, start_new_session=False, wait=True):
    """`python -m torch.distributed.run --nproc_per_node N script args`; returns CompletedProcess or Popen.

    script=None runs the real command: `... -m disent.cli args`.
    """
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    full_env.update(env or {})
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        *(["-m", "disent.cli"] if script is None else [str(script)]), *map(str, args),
    ]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=start_new_session)
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
