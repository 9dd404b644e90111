"""The benchmark scripts run end to end on tiny settings and print the JSON they promise.

Their figures are not checked here (timing asserts do not belong in tests); see README, Benchmarks.
bench_gpu.py's GPU idle time on a constructed trace: tests/unit/test_bench_gpu_idle.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.train_helpers import ROOT

TINY_MODEL = ["data.image_size=28", "data.channels=1", "data.num_classes=4", "model.s_dim=4", "model.z_dim=4",
              "model.base_channels=8", "model.disc_channels=8", "train.global_batch_size=8", "train.log_every=2"]


def bench(script: str, *args: str) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_data_measures_the_pipeline_against_memcpy_and_the_tar_read(tiny_data):
    out = bench("bench_data.py", "--url", str(tiny_data), "--workers", "0", "1", "--batches", "5", "--warmup", "2",
                "--batch-size", "8")
    (result,) = out["results"]
    assert result["memcpy"]["pairs_per_s"] > 0 and result["sequential_tar_read"]["pairs_per_s"] > 0
    assert [run["workers"] for run in result["pipeline"]] == [0, 1]
    for run in result["pipeline"]:
        assert run["pairs_per_s_per_core"] > 0 and run["per_core_to_memcpy"] > 0 and run["to_sequential"] > 0


def test_overhead_alternates_bare_and_framework(tiny_data):
    out = bench("bench_overhead.py", "--config", "configs/base.yaml", "--url", str(tiny_data), "--steps", "6",
                "--rounds", "2", "--bare-keeps-freed-memory", *TINY_MODEL)
    assert len(out["rounds"]) == 2 and out["framework_over_bare"] > 0 and out["bare_keeps_freed_memory"]
    for row in out["rounds"]:
        assert row["baseline"]["samples_per_s"] > 0 and row["candidate"]["samples_per_s"] > 0
        assert 0 <= row["candidate"]["data_wait_fraction"] < 1


def test_scaling_runs_one_and_two_ranks(tiny_data):
    out = bench("bench_scaling.py", "--config", "configs/base.yaml", "--url", str(tiny_data), "--steps", "6",
                "--rounds", "1", "--per-rank-batch", "4", *TINY_MODEL)
    assert out["two_over_one"] > 0 and out["per_rank_batch"] == 4


def test_growth_reports_time_and_memory_per_configuration():
    out = bench("bench_growth.py", "--config", "configs/base.yaml", "--sizes", "28", "32", "--batches", "4",
                "--steps", "2")
    assert [(r["image_size"], r["batch"]) for r in out["rows"]] == [(28, 4), (32, 4)]
    for row in out["rows"]:
        assert row["step_ms"] > 0 and row["peak_rss_mib"] > row["step_rss_mib"] >= 0
    assert out["rows"][0]["step_time_ratio"] > 0


def test_gpu_benchmark_skips_cleanly_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run benchmarks/bench_gpu.py itself")
    out = bench("bench_gpu.py", "--steps", "5")
    assert out == {"benchmark": "one GPU: train step vs loader", "skipped": "no CUDA device"}


def test_gpu_check_script_parses_and_exits_2_with_a_clear_message_without_cuda(tmp_path):
    script = ROOT / "benchmarks" / "gpu_check.sh"
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    out = tmp_path / "results"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "gpu_check: no CUDA device" in result.stderr and "Nothing was run" in result.stderr, result.stderr
    assert not out.exists()  # nothing installed, nothing written


