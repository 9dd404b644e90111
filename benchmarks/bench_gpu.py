"""One GPU: does the loader keep up with a training step? Samples/s and model FLOP utilisation of a
full `disent train` step, beside the loader's rate for the same config, measured in one run.

    python benchmarks/bench_gpu.py                                   # Fashion-MNIST, bf16, compiled
    python benchmarks/bench_gpu.py --config configs/sprites.yaml --batch 512 --steps 300
    python benchmarks/bench_gpu.py --url data/fashion_mnist --no-compile

Measured (on one GPU, one process):

* train: `disent train` as users run it (benchmarks/harness.py `train_rate`): the WebDataset
  PairLoader with `data.num_workers: auto`, both DeepSpeed engines (ZeRO 0), `train.precision`
  bf16 and `train.compile` unless --no-compile, MLflow to a local store. Its rate and the fraction
  of step time spent waiting for data are the trainer's own log windows after the first.
* flops: the model's FLOPs per sample of one training step (forward and backward of the VAE
  and the critics), counted by `torch.utils.flop_counter` on the plain PyTorch loop of the same
  model; model FLOP utilisation = flops/sample x samples/s / the GPU's peak bf16 rate (dense;
  from --peak-tflops or a table of known GPUs).
* loader: PairLoader alone on the same shards and batch, with the same worker count, as pairs/s
  (a training sample is one pair); `loader_over_train` > 1 means the loader is not the limit.

Without CUDA it prints {"skipped": ...} and exits 0, so it can sit in any script.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ROOT, BareLoop, train_rate  # noqa: E402

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
    ap.add_argument("--config", default="configs/fashion_mnist.yaml")
    ap.add_argument("--url", help="prepared shards; default: Fashion-MNIST (or sprites) prepared into a temp dir")
    ap.add_argument("--batch", type=int, default=256, help="train.global_batch_size (one GPU: the micro batch)")
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
    overrides = [f"train.global_batch_size={args.batch}", f"train.precision={args.precision}",
                 f"train.compile={str(not args.no_compile).lower()}", *args.overrides]
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url
        if url is None:
            from bench_data import prepare_data

            url = prepare_data("fashion", Path(tmp))
        flops = flops_per_sample(args.config, [o for o in overrides if not o.startswith("train.compile")])
        train = train_rate(args.config, url, args.steps, Path(tmp) / "run", overrides, threads_per_rank=4)
        loader = loader_rate(args.config, url, overrides, args.batch, batches=max(50, args.steps // 2))
    peak = peak_tflops(args.peak_tflops)
    achieved = flops * train["samples_per_s"] / 1e12
    result = {
        "benchmark": "one GPU: train step vs loader", "gpu": torch.cuda.get_device_name(), "config": args.config,
        "batch": args.batch, "precision": args.precision, "compile": not args.no_compile, "overrides": overrides,
        "train_samples_per_s": train["samples_per_s"], "step_ms": 1000 * args.batch / train["samples_per_s"],
        "data_wait_fraction": train["data_wait_fraction"],
        "model_gflops_per_sample": flops / 1e9, "achieved_tflops": achieved, "peak_tflops": peak,
        "model_flop_utilisation": achieved / peak if peak else None,
        "loader_pairs_per_s": loader["pairs_per_s"], "loader_workers": loader["workers"],
        "loader_over_train": loader["pairs_per_s"] / train["samples_per_s"],
    }
    print(f"{result['gpu']}: train {result['train_samples_per_s']:.0f} samples/s ({result['step_ms']:.2f} ms/step, "
          f"data wait {100 * result['data_wait_fraction']:.1f}%), {achieved:.2f} TFLOP/s"
          + (f" = {100 * result['model_flop_utilisation']:.2f}% of {peak:.0f}" if peak else "")
          + f"; loader {result['loader_pairs_per_s']:.0f} pairs/s with {loader['workers']} workers "
          f"= {result['loader_over_train']:.2f}x the step", file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
