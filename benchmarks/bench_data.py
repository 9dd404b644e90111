"""Pairs per second of the full data pipeline vs plain sequential reading of the same tar files.

    .venv/bin/python benchmarks/bench_data.py                  # Fashion-MNIST if installed, else sprites
    .venv/bin/python benchmarks/bench_data.py --url data/fashion_mnist --batches 300 --workers 0 1 2

Measured in one run, on the same shards:

* sequential: every shard of the split read start to end with Python's tarfile (members' bytes
  only, no decoding), the floor any tar-based loader pays. Its pair rate is samples/s / 2, since
  a pair (x1, x1') needs two samples.
* pipeline: PairLoader (WebDataset tar reading, npy decoding, per-class pools, pairing, batch
  assembly, tensors, DataLoader transfer) with 0, 1 and 2 workers. A pair here is one (x1, x1')
  of a batch (each batch also carries an independent (x2, x2') pair for the discriminator).
  Worker start-up and the first batches are excluded (warm-up).

Prints one JSON object: both rates and pipeline/sequential ratios.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from disent.config import DataConfig  # noqa: E402
from disent.data.manifest import read_manifest  # noqa: E402
from disent.data.stream import PairLoader  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")


def ensure_data(url: str | None, workdir: Path) -> str:
    if url:
        return url
    from disent.data.prepare import PrepareOptions, prepare
    from disent.data.sources import SourceOptions

    out = workdir / "data"
    source = f"idx:{FASHION}" if FASHION.is_dir() else "sprites"
    print(f"preparing {source} into {out} ...", file=sys.stderr)
    prepare(source, str(out), PrepareOptions(progress=False), SourceOptions(num_samples=20000),
            echo=lambda s: None)
    return str(out)


def sequential(manifest, passes: int) -> dict:
    """Read each shard's members start to end (no decode): samples per second."""
    nbytes = samples = 0
    t0 = time.perf_counter()
    for _ in range(passes):
        for info in manifest.shards:
            with open(info.url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
                for member in tf:
                    data = tf.extractfile(member).read()
                    nbytes += len(data)
            samples += info.samples
    dt = time.perf_counter() - t0
    return {"samples_per_s": samples / dt, "pairs_per_s": samples / dt / 2, "mb_per_s": nbytes / dt / 1e6,
            "seconds": dt, "samples": samples}


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
    return {"workers": cfg.num_workers, "pairs_per_s": batches * batch_size / dt,
            "images_per_s": batches * batch_size * 4 / dt, "batches_per_s": batches / dt, "seconds": dt,
            "warmup_seconds": first, "consumer_wait_seconds": loader.wait_seconds - wait0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="prepared data (local directory); default: prepare into a temp dir")
    ap.add_argument("--split", default="train")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=200, help="timed batches per worker setting")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--passes", type=int, default=1, help="sequential passes over the split")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        url = ensure_data(args.url, Path(tmp))
        if url.startswith("s3://"):
            raise SystemExit("the sequential baseline reads local files: pass a local --url")
        m = read_manifest(url, args.split)
        c, h, w = m.image_shape
        base = sequential(m, args.passes)
        runs = []
        for workers in args.workers:
            cfg = DataConfig(url=url, image_size=h, channels=c, num_classes=m.num_classes, num_workers=workers)
            run = pipeline(cfg, args.split, args.batch_size, args.batches, args.warmup)
            run["ratio_to_sequential"] = run["pairs_per_s"] / base["pairs_per_s"]
            runs.append(run)
        result = {
            "data": {"url": url, "split": args.split, "source": m.source.get("kind"), "samples": m.num_samples,
                     "shards": len(m.shards), "image_shape": list(m.image_shape), "group_size": m.group_size},
            "batch_size": args.batch_size,
            "cpus": os.cpu_count(),
            "sequential_tar_read": base,
            "pipeline": runs,
        }
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
