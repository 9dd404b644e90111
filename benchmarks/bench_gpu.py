"""One GPU: does a training step keep the GPU busy, and does the loader keep up with it? Samples/s,
model FLOP utilisation and the GPU's idle time within a full `disent train` step, beside the loader's
rate for the same config, measured in one run.

    python benchmarks/bench_gpu.py                                   # configs/sprites_gpu.yaml: bf16, compiled
    python benchmarks/bench_gpu.py --steps 150 --out results/bench   # shorter; keep the run's profile
    python benchmarks/bench_gpu.py --config configs/fashion_mnist.yaml --batch 512 --no-compile

Measured (on one GPU, one process):

* train: `disent train` as users run it (benchmarks/harness.py `train_rate`): the WebDataset
  PairLoader with the config's `data.num_workers`, both DeepSpeed engines, `train.precision` bf16
  and `train.compile` unless --no-compile, MLflow to a local store, on one GPU at --batch, the
  per-GPU micro batch (sprites_gpu.yaml ships 2048 over 8 GPUs: 256). Its rate and the fraction of
  step time spent waiting for data are the trainer's own log windows after the first.
* gpu idle: the same run profiles PROFILE_STEPS steps inside its first (untimed) log window
  (`train.profile_steps`); in the Chrome trace, the fraction of those steps' wall time in which no
  kernel, memcpy or memset ran on the GPU. The profiler's own CPU cost makes steps slower, so this
  is an upper bound on the idle time of an unprofiled step (`profiled_step_ms` against `step_ms`).
* flops: the model's FLOPs per sample of one training step (forward and backward of the VAE
  and the critics), counted by `torch.utils.flop_counter` on the plain PyTorch loop of the same
  model; model FLOP utilisation = flops/sample x samples/s / the GPU's peak bf16 rate (dense;
  from --peak-tflops or a table of known GPUs).
* loader: PairLoader alone on the same shards and batch, with the same worker count, as pairs/s
  (a training sample is one pair); `loader_over_train` > 1 means the loader is not the limit.

`keeps_gpu_busy` is true when the profiled GPU idle fraction is under 10% and the trainer waited for
data under 5% of the step; false names which one failed (`why`).

Without CUDA it prints {"skipped": ...} and exits 0, so it can sit in any script.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ROOT, BareLoop, train_rate  # noqa: E402

PROFILE_STEPS = 10
BUSY_IDLE_FRACTION, BUSY_DATA_WAIT = 0.10, 0.05
GPU_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")

# Dense bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0,
                    "V100": 125.0, "RTX 4090": 165.0}


def peak_tflops(given: float | None) -> float | None:
    if given:
        return given
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def flops_per_sample(config: str, overrides: list[str]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    bare = BareLoop(config, overrides, threads=1, device="cuda")
    bare.step()  # allocations and lazy initialisation outside the count
    with FlopCounterMode(display=False) as counter:
        bare.step()
    return counter.get_total_flops() / bare.batch_size


def gpu_idle(trace: Path) -> dict | None:
    """From a torch.profiler Chrome trace: over the span of its ProfilerStep#N annotations, the fraction
    of wall time in which no GPU kernel, memcpy or memset ran (the union of their intervals, clipped to
    the span). None when the trace holds no steps or no GPU activity (no CUPTI, a CPU run)."""
    try:
        events = json.loads(trace.read_text())["traceEvents"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    steps, busy = [], []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        start, end = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith("ProfilerStep#"):
            steps.append((start, end))
        elif e.get("cat") in GPU_EVENTS:
            busy.append((start, end))
    if not steps or not busy:
        return None
    lo, hi = min(s for s, _ in steps), max(e for _, e in steps)
    covered, reach = 0.0, lo
    for start, end in sorted(busy):
        start, end = max(start, reach), min(end, hi)
        if end > start:
            covered += end - start
            reach = end
    span = hi - lo
    return {"gpu_idle_fraction": 1 - covered / span, "profiled_steps": len(steps),
            "profiled_step_ms": span / len(steps) / 1000, "gpu_busy_ms_per_step": covered / len(steps) / 1000}


def data_for(config: str, overrides: list[str], workdir: Path) -> str:
    """Shards of the config's image shape, prepared into workdir: sprites at 64x64 (records of 256 as
    `disent prepare` writes them, 2 per shard so that each of a rank's workers has shards of its own),
    or Fashion-MNIST at 28x28 where its Debian package is installed."""
    from bench_data import FASHION, prepare_data

    from disent.cli import main as disent_main
    from disent.config import load_config

    data = load_config(ROOT / config, overrides).data
    shape = (data.image_size, data.channels, data.num_classes)
    if shape == (64, 3, 5):
        out = workdir / "sprites64"
        print(f"preparing sprites at 64x64 into {out} ...", file=sys.stderr)
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the result
            code = disent_main(["prepare", "sprites", str(out), "--image-size", "64", "--num-samples", "12000",
                                "--groups-per-shard", "2", "--no-progress"])
        if code != 0:
            raise SystemExit("disent prepare sprites failed")
        return str(out)
    if shape == (28, 1, 10) and FASHION.is_dir():
        return prepare_data("fashion", workdir)
    raise SystemExit(f"no data set to prepare for {config}'s {shape[0]}x{shape[0]}x{shape[1]}, {shape[2]} classes: "
                     "pass --url with prepared shards")


def loader_rate(config: str, url: str, overrides: list[str], batch: int, batches: int) -> dict:
    from disent.config import load_config
    from disent.data.stream import PairLoader

    cfg = load_config(ROOT / config, [*overrides, f"data.url={url}"])
    loader = PairLoader(cfg.data, cfg.data.train_split, batch_size=batch, seed=cfg.seed)
    it = iter(loader)
    for _ in range(10):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        batch_on_gpu = {k: v.cuda(non_blocking=True) for k, v in next(it).items() if k.startswith("x")}
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    loader.close()
    del batch_on_gpu
    return {"pairs_per_s": batches * batch / seconds, "workers": loader.num_workers, "batches": batches}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/sprites_gpu.yaml", help="default: the shipped one-node GPU config")
    ap.add_argument("--url", help="prepared shards; default: sprites 64x64 (or Fashion-MNIST for a 28x28 config) "
                    "prepared into a temp dir")
    ap.add_argument("--batch", type=int, default=256,
                    help="train.global_batch_size on this one GPU: the per-GPU micro batch (default 256, as "
                    "sprites_gpu.yaml's 2048 over 8 GPUs)")
    ap.add_argument("--out", type=Path, help="keep the training run's metrics.jsonl and profile (top operators, "
                    "trace) in this folder")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--peak-tflops", type=float, help="the GPU's peak rate for --precision (default: known GPUs)")
    ap.add_argument("overrides", nargs="*", help="further config overrides for every part")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"benchmark": "one GPU: train step vs loader", "skipped": "no CUDA device"}))
        return 0
    os.environ.setdefault("DS_ACCELERATOR", "cuda")
    from disent.config import load_config

    # One log window before the timed ones holds the profiled steps (after the profiler's 5 skipped + 1 warm-up).
    log_every = max(PROFILE_STEPS + 10, min(50, args.steps // 3))
    overrides = [f"train.global_batch_size={args.batch}", f"train.precision={args.precision}",
                 f"train.compile={str(not args.no_compile).lower()}", *args.overrides]
    # the steps are what is measured: no final evaluation, no model logged
    run_only = ["eval.at_end=false", "tracking.log_model=false"]
    grad_accum = load_config(ROOT / args.config, overrides).train.grad_accum
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url or data_for(args.config, overrides, Path(tmp))
        flops = flops_per_sample(args.config, [o for o in overrides if not o.startswith("train.compile")])
        run_dir = Path(tmp) / "run"
        train = train_rate(args.config, url, args.steps, run_dir, [
            f"train.log_every={log_every}", f"train.profile_steps={PROFILE_STEPS}", *run_only, *overrides],
            threads_per_rank=4)
        ran = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
        idle = gpu_idle(run_dir / "profile" / "trace-rank0.json")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            for path in [run_dir / "metrics.jsonl", run_dir / "summary.json", *sorted((run_dir / "profile").glob("*rank0*"))]:
                shutil.copy(path, args.out / path.name)
        loader = loader_rate(args.config, url, overrides, args.batch, batches=max(50, args.steps // 2))
    peak = peak_tflops(args.peak_tflops)
    achieved = flops * train["samples_per_s"] / 1e12
    step_ms = 1000 * args.batch / train["samples_per_s"]
    why = []
    if idle is None:
        why.append("no GPU activity in the profile (is CUPTI available?)")
    elif idle["gpu_idle_fraction"] >= BUSY_IDLE_FRACTION:
        why.append(f"the GPU idled {100 * idle['gpu_idle_fraction']:.0f}% of a profiled step")
    if train["data_wait_fraction"] >= BUSY_DATA_WAIT:
        why.append(f"the step waited for data {100 * train['data_wait_fraction']:.0f}% of its time")
    result = {
        "benchmark": "one GPU: train step vs loader", "gpu": torch.cuda.get_device_name(), "config": args.config,
        "batch": args.batch, "micro_batch_per_gpu": args.batch // grad_accum, "grad_accum": grad_accum,
        "precision": args.precision, "compile": not args.no_compile, "overrides": overrides,
        "train_samples_per_s": train["samples_per_s"], "step_ms": step_ms,
        "data_wait_fraction": train["data_wait_fraction"],
        "gpu_idle_fraction": idle["gpu_idle_fraction"] if idle else None,
        "profiled_step_ms": idle["profiled_step_ms"] if idle else None,
        "gpu_busy_ms_per_step": idle["gpu_busy_ms_per_step"] if idle else None,
        "keeps_gpu_busy": None if idle is None else not why, "why": why,
        "model_gflops_per_sample": flops / 1e9, "achieved_tflops": achieved, "peak_tflops": peak,
        "model_flop_utilisation": achieved / peak if peak else None,
        "loader_pairs_per_s": loader["pairs_per_s"], "loader_workers": loader["workers"],
        "loader_over_train": loader["pairs_per_s"] / train["samples_per_s"],
        # what ran (the run's summary.json): first step, decoder output dtype, peak memory, compile counters, losses
        "ran": ran,
    }
    print(f"{result['gpu']}: micro batch {result['micro_batch_per_gpu']}, train {result['train_samples_per_s']:.0f} "
          f"samples/s ({step_ms:.2f} ms/step, data wait {100 * result['data_wait_fraction']:.1f}%"
          + (f", GPU idle {100 * idle['gpu_idle_fraction']:.1f}% of a profiled {idle['profiled_step_ms']:.2f} ms step"
             if idle else ", GPU idle: no profile") + f"), {achieved:.2f} TFLOP/s"
          + (f" = {100 * result['model_flop_utilisation']:.2f}% of {peak:.0f}" if peak else "")
          + f"; loader {result['loader_pairs_per_s']:.0f} pairs/s with {loader['workers']} workers "
          f"= {result['loader_over_train']:.2f}x the step; keeps the GPU busy: "
          + ("unknown" if idle is None else "yes" if not why else "no (" + "; ".join(why) + ")"), file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
