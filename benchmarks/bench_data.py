"""The data pipeline against the limits of this machine, for small grey and larger colour images.

    .venv/bin/python benchmarks/bench_data.py                          # 28x28 grey and 64x64 colour, 0/1/2 workers
    .venv/bin/python benchmarks/bench_data.py --data fashion --workers 0 --batches 100
    .venv/bin/python benchmarks/bench_data.py --url data/fashion_mnist  # shards already prepared

For each data set, measured in one run on the same shards (a pair is (x1, x1'): two images, e.g.
2 x 784 B = 1.6 kB at 28x28 grey):

* memcpy: the bytes of every tar member of the split, already in memory, copied into another
  buffer (numpy copyto) and counted as pairs. No loader can deliver images faster than it can
  copy them once; this is the ceiling per core.
* sequential: every shard read start to end with Python's tarfile (members' bytes only, no
  decoding), the floor any tar-based loader pays.
* pipeline: PairLoader (shard reading, decoding, per-class pools, pairing, batch assembly,
  tensors, DataLoader transfer) with 0, 1 and 2 workers. A batch also carries an independent
  (x2, x2') pair for the discriminator, which is not counted. Worker start-up and the first
  batches are excluded (warm-up). Loader cores: the workers, or the consuming process with 0.

Prints a table to stderr and one JSON object to stdout: every rate, pairs/s per loader core, the
ratios to memcpy and to the sequential read, and the target per core (issue: 100k pairs/s per
core at 28x28 grey, 20k at 64x64 colour).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from disent.config import DataConfig  # noqa: E402
from disent.data.manifest import read_manifest  # noqa: E402
from disent.data.stream import PairLoader  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
# name -> (source, image size, samples drawn for generated sources, target pairs/s per loader core)
DATA_SETS = {
    "fashion": (f"idx:{FASHION}", 28, 0, 100_000) if FASHION.is_dir() else ("sprites", 32, 20000, 100_000),
    "sprites64": ("sprites", 64, 8000, 20_000),
}


def prepare_data(name: str, workdir: Path) -> str:
    from disent.data.prepare import PrepareOptions, prepare
    from disent.data.sources import SourceOptions

    source, size, samples, _ = DATA_SETS[name]
    out = workdir / name
    print(f"preparing {source} at {size}x{size} into {out} ...", file=sys.stderr)
    prepare(source, str(out), PrepareOptions(progress=False), SourceOptions(num_samples=samples, image_size=size),
            echo=lambda s: None)
    return str(out)


def member_bytes(manifest) -> list[bytes]:
    out = []
    for info in manifest.shards:
        with open(info.url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
            out += [tf.extractfile(member).read() for member in tf]
    return out


def memcpy(manifest, pair_bytes: int, min_seconds: float = 0.5) -> dict:
    """One core copying the split's bytes from memory to memory, as pairs/s."""
    source = np.frombuffer(b"".join(member_bytes(manifest)), np.uint8)
    target = np.empty_like(source)
    copies = 0
    t0 = time.perf_counter()
    while (dt := time.perf_counter() - t0) < min_seconds or copies == 0:
        np.copyto(target, source)
        copies += 1
    rate = copies * source.nbytes / dt
    return {"mb_per_s": rate / 1e6, "pairs_per_s": rate / pair_bytes, "bytes": int(source.nbytes)}


def sequential(manifest, pair_bytes: int, passes: int) -> dict:
    """Read each shard's members start to end (no decode)."""
    nbytes = samples = 0
    t0 = time.perf_counter()
    for _ in range(passes):
        for info in manifest.shards:
            with open(info.url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
                for member in tf:
                    nbytes += len(tf.extractfile(member).read())
            samples += info.samples
    dt = time.perf_counter() - t0
    return {"pairs_per_s": samples / dt / 2, "mb_per_s": nbytes / dt / 1e6, "seconds": dt, "samples": samples}


def pipeline(cfg: DataConfig, split: str, batch_size: int, batches: int, warmup: int) -> dict:
    loader = PairLoader(cfg, split, batch_size=batch_size, rank=0, world_size=1, seed=0)
    it = iter(loader)
    t_start = time.perf_counter()
    for _ in range(warmup):
        next(it)
    first = time.perf_counter() - t_start
    wait0 = loader.wait_seconds
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t0
    loader.close()
    pairs = batches * batch_size / dt
    return {"workers": cfg.num_workers, "loader_cores": max(1, cfg.num_workers), "pairs_per_s": pairs,
            "pairs_per_s_per_core": pairs / max(1, cfg.num_workers), "batches_per_s": batches / dt,
            "seconds": dt, "warmup_seconds": first, "consumer_wait_seconds": loader.wait_seconds - wait0}


def measure(url: str, target: int | None, args) -> dict:
    m = read_manifest(url, args.split)
    c, h, w = m.image_shape
    pair_bytes = 2 * c * h * w
    ceiling, floor = memcpy(m, pair_bytes), sequential(m, pair_bytes, args.passes)
    runs = []
    for workers in args.workers:
        cfg = DataConfig(url=url, image_size=h, channels=c, num_classes=m.num_classes, num_workers=workers)
        run = pipeline(cfg, args.split, args.batch_size, args.batches, args.warmup)
        run["per_core_to_memcpy"] = run["pairs_per_s_per_core"] / ceiling["pairs_per_s"]
        run["to_sequential"] = run["pairs_per_s"] / floor["pairs_per_s"]
        if target:
            run["per_core_to_target"] = run["pairs_per_s_per_core"] / target
        runs.append(run)
    return {
        "data": {"url": url, "split": args.split, "source": m.source.get("kind"), "samples": m.num_samples,
                 "shards": len(m.shards), "image_shape": [c, h, w], "group_size": m.group_size,
                 "pair_bytes": pair_bytes},
        "target_pairs_per_s_per_core": target,
        "memcpy": ceiling,
        "sequential_tar_read": floor,
        "pipeline": runs,
    }


def table(results: list[dict]) -> str:
    lines = ["data           workers  pairs/s   per core  x memcpy  x tar read  target/core",]
    for r in results:
        shape = "x".join(map(str, r["data"]["image_shape"]))
        lines.append(f"{shape:<14} memcpy   {r['memcpy']['pairs_per_s']:>9.0f}")
        lines.append(f"{shape:<14} tar read {r['sequential_tar_read']['pairs_per_s']:>9.0f}")
        for run in r["pipeline"]:
            lines.append(f"{shape:<14} {run['workers']:>7}  {run['pairs_per_s']:>8.0f}  {run['pairs_per_s_per_core']:>8.0f}"
                         f"  {run['per_core_to_memcpy']:>8.4f}  {run['to_sequential']:>10.2f}"
                         f"  {r['target_pairs_per_s_per_core'] or '-':>11}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", choices=sorted(DATA_SETS), default=list(DATA_SETS),
                    help="data sets to prepare and measure (default: all)")
    ap.add_argument("--url", help="measure these prepared shards (a local directory) instead of --data")
    ap.add_argument("--split", default="train")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=200, help="timed batches per worker setting")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--passes", type=int, default=1, help="sequential passes over the split")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's malloc thresholds alone (disent train fixes them, so by default this does too)")
    args = ap.parse_args()
    malloc_fixed = False
    if not args.default_malloc:
        from disent.train.engines import keep_freed_memory_for_reuse

        malloc_fixed = keep_freed_memory_for_reuse()
    if args.url and args.url.startswith("s3://"):
        raise SystemExit("bench_data.py: the memcpy and tar baselines read local files; pass a local --url")

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        if args.url:
            results = [measure(args.url, None, args)]
        else:
            results = [measure(prepare_data(name, Path(tmp)), DATA_SETS[name][3], args) for name in args.data]
    print(table(results), file=sys.stderr)
    print(json.dumps({"batch_size": args.batch_size, "cpus": os.cpu_count(), "malloc_thresholds_fixed": malloc_fixed,
                      "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
