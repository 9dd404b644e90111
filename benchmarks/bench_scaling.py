"""Scaling: samples/s of `disent train` on 2 ranks against 1 rank, same per-rank batch.

    .venv/bin/python benchmarks/bench_scaling.py                        # Fashion-MNIST shards, 3 rounds
    .venv/bin/python benchmarks/bench_scaling.py --per-rank-batch 64 --steps 200 --rounds 3

Both sides are full `disent train` runs (WebDataset loader, both DeepSpeed engines, MLflow),
measured in alternating rounds with the trainer's own `samples_per_s` (log windows after the
first). Each rank gets one compute thread, so the ratio shows what data parallelism costs
(gradient all-reduce over gloo, stragglers, loader workers sharing the cores), not how well one
process's intra-op threads scale:

* 1 rank: `disent train` with OMP_NUM_THREADS=1, global batch = per-rank batch.
* 2 ranks: `python -m launcher --nproc 2 -- disent train`, OMP_NUM_THREADS=1 per rank, global
  batch = 2 x per-rank batch.

`--also-threads` adds one 1-rank run with all of the machine's cores as intra-op threads (the
alternative way to use them), reported beside the ratio.

Prints one JSON object: every round, the median rates and the median 2-rank/1-rank ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from harness import alternate, train_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/fashion_mnist.yaml")
    parser.add_argument("--url", default="data/fashion_mnist", help="prepared shards (disent prepare ...)")
    parser.add_argument("--per-rank-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200, help="steps per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--also-threads", action="store_true")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = parser.parse_args()
    per_rank = args.per_rank_batch

    def run(tmp: Path, name: str, nproc: int, threads: int) -> dict:
        batch = [f"train.global_batch_size={per_rank * nproc}"]
        given = [o for o in args.overrides if not o.startswith("train.global_batch_size=")]  # the batch is set here
        return train_rate(args.config, args.url, args.steps, tmp / name, [*given, *batch], nproc, threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result = alternate(args.rounds, lambda i: run(tmp, f"one{i}", 1, 1), lambda i: run(tmp, f"two{i}", 2, 1))
        extra = {}
        if args.also_threads:
            cores = len(os.sched_getaffinity(0))
            extra["one_rank_all_cores"] = {"threads": cores, **run(tmp, "threads", 1, cores)}
    print(json.dumps({
        "benchmark": "2 ranks vs 1 rank", "config": args.config, "per_rank_batch": per_rank, "steps": args.steps,
        "threads_per_rank": 1, "overrides": args.overrides, **result, "two_over_one": result["ratio"], **extra,
    }, indent=2))


if __name__ == "__main__":
    main()
