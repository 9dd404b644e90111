"""Cost growth: training step time and peak memory as the image size and the batch size grow.

    .venv/bin/python benchmarks/bench_growth.py                          # sizes 28 32 64, batches 16 64 256
    .venv/bin/python benchmarks/bench_growth.py --sizes 28 64 --batches 64 --steps 20

Each configuration runs the training step of `disent train` (model, losses, both AdamW
optimizers, clipping; benchmarks/harness.py) in a fresh process with one compute thread, so its
peak memory is its own:

* step_ms: mean wall time of one step after warm-up;
* peak_rss_mib / step_rss_mib: the process's peak resident memory, and how much of it the steps
  added on top of the built model (activations, gradients, optimizer state); on a GPU also
  cuda_peak_mib (torch.cuda.max_memory_allocated).

Ratios are against the baseline configuration (the first size and batch given), which runs first
and again last; the two baseline runs' spread says how noisy the machine was.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_one(config: str, size: int, batch: int, steps: int, device: str) -> dict:
    import torch

    from harness import BareLoop

    loop = BareLoop(config, [f"data.image_size={size}", f"train.global_batch_size={batch}"], threads=1, device=device)
    before = _status_mib("VmRSS")
    rate = loop.rate(steps, warmup=3)
    peak = _status_mib("VmHWM")
    out = {"image_size": size, "batch": batch, "step_ms": rate["step_ms"], "samples_per_s": rate["samples_per_s"],
           "peak_rss_mib": peak, "step_rss_mib": peak - before}
    if device == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_child(config: str, size: int, batch: int, steps: int, device: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--config", config, "--sizes", str(size), "--batches", str(batch),
           "--steps", str(steps), "--device", device]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"size {size} batch {batch} failed:\n{result.stderr[-3000:]}")
    row = json.loads(result.stdout)
    print(f"size {size:3d} batch {batch:4d}: {row['step_ms']:8.1f} ms/step  peak {row['peak_rss_mib']:7.0f} MiB",
          file=sys.stderr)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/fashion_mnist.yaml")
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 32, 64])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_one(args.config, args.sizes[0], args.batches[0], args.steps, args.device)))
        return
    base_size, base_batch = args.sizes[0], (64 if 64 in args.batches else args.batches[0])
    first = run_child(args.config, base_size, base_batch, args.steps, args.device)
    rows = [run_child(args.config, size, batch, args.steps, args.device)
            for size in args.sizes for batch in args.batches]
    last = run_child(args.config, base_size, base_batch, args.steps, args.device)
    base_ms = statistics.fmean([first["step_ms"], last["step_ms"]])
    base_mem = statistics.fmean([first["step_rss_mib"], last["step_rss_mib"]])
    for row in rows:
        row["step_time_ratio"] = row["step_ms"] / base_ms
        row["per_sample_time_ratio"] = row["step_time_ratio"] * base_batch / row["batch"]
        row["step_memory_ratio"] = row["step_rss_mib"] / base_mem if base_mem > 0 else None
    print(json.dumps({
        "benchmark": "cost growth", "config": args.config, "steps": args.steps, "threads": 1, "device": args.device,
        "baseline": {"image_size": base_size, "batch": base_batch, "step_ms_first": first["step_ms"],
                     "step_ms_last": last["step_ms"], "step_rss_mib": base_mem},
        "rows": rows,
    }, indent=2))


if __name__ == "__main__":
    main()
