"""`make demo`: the main job end to end on the embedded default.

Prepares Fashion-MNIST shards locally (from Debian's dataset-fashion-mnist), trains a short
run on 2 CPU ranks through the launcher, evaluates it, logs everything to ./mlflow.db, and
prints the run id and the command that opens the MLflow UI on it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from disent.checkpoint import CheckpointManager
from disent.data.sources import ensure_fashion_mnist

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CONFIG = "configs/fashion_mnist.yaml"
DATA = "data/fashion_mnist"
RUN_DIR = "runs/demo"
TRACKING_URI = "sqlite:///mlflow.db"


def step(title: str) -> None:
    print(f"\n==> {title}", flush=True)


def run(*command: str) -> None:
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)


def disent(*args: str) -> list[str]:
    return [sys.executable, "-m", "disent.cli", *args]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m disent.demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=600, help="training steps (default: 600, about 75 s on 2 cores)")
    parser.add_argument("--nproc", type=int, default=2, help="CPU ranks")
    args = parser.parse_args(argv)
    started = time.monotonic()
    os.environ["MLFLOW_TRACKING_URI"] = TRACKING_URI

    step("1/4 data: Fashion-MNIST -> pre-grouped WebDataset shards")
    ensure_fashion_mnist(install=True)
    if Path(DATA, "train", "manifest.json").exists():
        print(f"{DATA} already prepared (delete it to prepare again)")
    else:
        run(*disent("prepare", f"idx:{FASHION_MNIST}", DATA))

    # CPU ranks on any machine: two ranks cannot share one GPU under NCCL, and the demo is sized for CPUs.
    overrides = ["train.device=cpu", f"run_dir={RUN_DIR}", f"train.steps={args.steps}", "train.checkpoint_every=200",
                 f"train.eval_every={args.steps}", "eval.max_train_samples=3000", "eval.max_test_samples=2000"]
    step(f"2/4 train: {args.steps} steps on {args.nproc} CPU ranks (two DeepSpeed engines, gloo)")
    run(sys.executable, "-m", "launcher", "--nproc", str(args.nproc), "--",
        *disent("train", CONFIG, *overrides))

    step("3/4 evaluate: class probes on s and z, reconstruction and swap errors, grids")
    run(*disent("eval", RUN_DIR))

    step("4/4 results")
    report = json.loads((CheckpointManager.resolve(RUN_DIR).eval_dir / "eval.json").read_text())
    run_id = report["mlflow_run_id"]
    experiment_id = MlflowClient(TRACKING_URI).get_run(run_id).info.experiment_id
    print(f"class from s: {report['class_from_s_mlp']:.3f} (MLP probe), {report['class_from_s_linear']:.3f} (linear)")
    print(f"class from z: {report['class_from_z_mean_mlp']:.3f} (MLP on the mean), "
          f"{report['class_from_z_sample_mlp']:.3f} (MLP on sampled z); chance {report['chance']:.3f}")
    print(f"published protocols: Jha et al.'s MLP on sampled z {report['jha_class_from_z_sample']:.3f}, logistic "
          f"regression on the mean {report['logreg_class_from_z_mean']:.3f}")
    print(f"z_gain {report['z_gain']:.3f} (share of the error only the image's own z removes), z signal-to-noise "
          f"{report['z_snr']:.2f}")
    print(f"reconstruction MSE {report['reconstruction_mse']:.4f}, swap MSE {report['swap_mse']:.4f}")
    print(f"swap grid: {report['grids']['swap_grid']}")
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s")
    print(f"MLflow run id: {run_id}")
    print(f"Use the model from Python:  import disent; model = disent.load({str(RUN_DIR)!r})  "
          f"# or disent.load('runs:/{run_id}/model') with MLFLOW_TRACKING_URI={TRACKING_URI}")
    mlflow = Path(sys.executable).parent / "mlflow"
    print(f"Open the MLflow UI on it:\n  cd {Path.cwd()} && {mlflow} ui --backend-store-uri {TRACKING_URI} "
          f"--host 127.0.0.1 --port 5000\n"
          f"  then browse http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
