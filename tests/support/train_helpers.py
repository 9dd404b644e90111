"""Helpers for the training tests: tiny real shards, tiny configs, a torchrun wrapper, and what a run
leaves behind (its complete checkpoints, step directories, metrics.jsonl, "resumed from" lines).

`tests/support/train_worker.py` (under torchrun) adds test-only hooks to `disent train`.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from disent.host import free_port


ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "train_worker.py"


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
    rc = disent_main(["prepare", f"npz:{out / 'tiny.npz'}", str(data), "--no-progress", "--group-size", "4", "--groups-per-shard", "20",
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
        "train.device": "cpu",
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
        "tracking.log_model": False,  # tests/integration/test_api.py logs and loads it; here it would only cost time
        "tracking.run_name": "tiny",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


STAGES = (0, 1, 2)  # the ZeRO stages every shipped config is checked under


def shipped_configs(tmp_path: Path) -> dict[str, Path]:
    """name -> config file: configs/*.yaml and the k8s ConfigMap's config (its /app paths mapped to this
    checkout, as in the image)."""
    found = {path.stem: path for path in sorted((ROOT / "configs").glob("*.yaml"))}
    for doc in yaml.safe_load_all((ROOT / "k8s" / "job.yaml").read_text()):
        if doc and doc.get("kind") == "ConfigMap":
            for key, text in doc["data"].items():
                local = tmp_path / f"k8s-{key}"
                local.write_text(text.replace("/app/configs/", f"{ROOT}/configs/"))
                found[f"k8s:{key}"] = local
    return found


def torchrun(args, nproc=2, env=None, timeout=300, script=WORKER, cwd=ROOT, start_new_session=False, wait=True):
    """`python -m torch.distributed.run --nproc_per_node N script args`; returns CompletedProcess or Popen.

    script=None runs the real command: `... -m disent.cli args`.
    """
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
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


# --------------------------------------------------------------------------- what a run leaves behind


def step_dir(run_dir, step: int) -> Path:
    """run_dir/checkpoints/step-NNNNNNNN, the checkpoint of `step`."""
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def complete_checkpoints(run_dir) -> list[int]:
    """Steps of the complete checkpoints under run_dir, oldest first (read through the product's own listing)."""
    from disent.checkpoint import CheckpointManager

    return [c.step for c in CheckpointManager(run_dir).checkpoints() if c.complete]


RESUMED = re.compile(r"resumed from \S+step-(\d+) at step (\d+)")


def resumed_from(output: str) -> list[int]:
    """The step of every "resumed from .../step-N at step N" line the trainer logged (the two are one)."""
    return [int(step) for _, step in RESUMED.findall(output)]


def metric_lines(run_dir) -> list[dict]:
    """The records of run_dir/metrics.jsonl, in file order (a resumed run appends); [] before the first."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]  # a line still being written is left for the next read
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def logged_steps(run_dir) -> list[int]:
    """The steps of run_dir/metrics.jsonl, in file order."""
    return [record["step"] for record in metric_lines(run_dir)]
