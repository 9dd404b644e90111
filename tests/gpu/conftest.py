"""tests/gpu/: checks that need a CUDA device, run on a GPU machine by benchmarks/gpu_check.sh
(`pytest -m gpu tests/gpu`). Every test in this folder carries the marker `gpu` (so tests/conftest.py
leaves the GPUs visible to it) and is skipped, with the one reason "needs a CUDA device", where no
CUDA device is visible.

Each test trains with the real command (`python -m disent.cli train`, torchrun for 2 ranks) on the
shipped GPU config, on sprites shards drawn here (no data set needs to be on the machine), for a few
dozen steps with small evaluations (tests/support/gpu_helpers.py). Every run's output goes to
$DISENT_GPU_CHECK_OUT/logs/ when that variable is set (gpu_check.sh sets it), else to a temp folder.

DISENT_GPU_TESTS_DEVICE=cpu runs the same test code on CPU with a tiny model, no compile and no fp16,
to develop these tests on a machine without CUDA; it checks nothing about GPUs.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.gpu_helpers import DRY_RUN, SKIP_REASON, Runs, cuda_devices

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    mine = [item for item in items if HERE in Path(str(item.path)).resolve().parents]
    if not mine:
        return
    skip = None if DRY_RUN or cuda_devices() > 0 else pytest.mark.skip(reason=SKIP_REASON)
    for item in mine:
        item.add_marker(pytest.mark.gpu)
        if skip is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def gpu_out(tmp_path_factory) -> Path:
    """Where figures and logs go: $DISENT_GPU_CHECK_OUT (gpu_check.sh's results folder) or a temp dir."""
    given = os.environ.get("DISENT_GPU_CHECK_OUT")
    out = Path(given) if given else tmp_path_factory.mktemp("gpu-check-out")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="session")
def sprites64(tmp_path_factory) -> Path:
    """Real sprites shards of the GPU config's shape (64x64 colour, 5 classes) from `disent prepare sprites`:
    4000 drawn; 3200 for training in groups of 32 (13 shards), 400 test. $DISENT_GPU_SHARDS: shards of that shape
    prepared already (gpu_check.sh prepares them once for the benchmark and the tests)."""
    from disent.cli import main as disent_main

    if os.environ.get("DISENT_GPU_SHARDS"):
        return Path(os.environ["DISENT_GPU_SHARDS"])
    out = tmp_path_factory.mktemp("sprites64") / "shards"
    assert disent_main(["prepare", "sprites", str(out), "--image-size", "64", "--num-samples", "4000",
                        "--group-size", "32", "--groups-per-shard", "8", "--no-progress", "--overwrite"]) == 0
    return out


@pytest.fixture(scope="session")
def runs(gpu_out, sprites64) -> Runs:
    return Runs(gpu_out, sprites64)
