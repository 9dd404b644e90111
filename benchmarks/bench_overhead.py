"""Framework overhead: samples/s of a full `disent train` step against a bare PyTorch loop.

    .venv/bin/python benchmarks/bench_overhead.py                       # Fashion-MNIST shards, 3 rounds
    .venv/bin/python benchmarks/bench_overhead.py --steps 200 --rounds 5 --url data/fashion_mnist

Both sides single process, one compute thread (OMP_NUM_THREADS=1), measured in alternating rounds:

* framework: `disent train` as users run it, with the config's defaults: the WebDataset
  PairLoader on real shards (`data.num_workers: auto`: one loader worker here), both DeepSpeed engines
  (ZeRO 0, fp32), MLflow logging to a local store every `train.log_every` steps. Its rate is the
  trainer's own `samples_per_s`, averaged over the log windows after the first (warm-up); start-up,
  the final checkpoint and the final evaluation are outside the windows.
* bare: the same model, losses (`disent.models.objective`), AdamW optimizers and gradient
  clipping in a plain PyTorch loop on uint8 batches already in memory (benchmarks/harness.py).
  `--bare-keeps-freed-memory` gives it the glibc malloc thresholds `disent train` sets
  (`keep_freed_memory_for_reuse`), to compare like with like.

Prints one JSON object: every round, the median rates and the median framework/bare ratio.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from harness import BareLoop, alternate, train_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/fashion_mnist.yaml")
    parser.add_argument("--url", default="data/fashion_mnist", help="prepared shards (disent prepare ...)")
    parser.add_argument("--steps", type=int, default=200, help="steps per round and side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bare-keeps-freed-memory", action="store_true",
                        help="the bare loop also fixes glibc's malloc thresholds, as disent train does")
    parser.add_argument("overrides", nargs="*", help="config overrides for both sides")
    args = parser.parse_args()
    if args.bare_keeps_freed_memory:
        from disent.train.engines import keep_freed_memory_for_reuse

        if not keep_freed_memory_for_reuse():
            raise SystemExit("--bare-keeps-freed-memory: not glibc, or the environment sets the allocator")
    bare = BareLoop(args.config, args.overrides, threads=1)
    with tempfile.TemporaryDirectory() as tmp:
        result = alternate(
            args.rounds,
            lambda i: bare.rate(args.steps),
            lambda i: train_rate(args.config, args.url, args.steps, Path(tmp) / f"round{i}", args.overrides),
        )
    print(json.dumps({
        "benchmark": "framework vs bare PyTorch", "config": args.config, "steps": args.steps, "threads": 1,
        "overrides": args.overrides, "bare_keeps_freed_memory": args.bare_keeps_freed_memory, **result,
        "framework_over_bare": result["ratio"],
    }, indent=2))


if __name__ == "__main__":
    main()
