"""Tiny raw sources for `disent prepare`: an .npz, an IDX directory (Fashion-MNIST's format), a folder of
images per class. Each sample's index is written into its first pixels, so tests can tell samples apart.
And small shards prepared from an .npz, with the data config that reads them (the pair-stream tests)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from disent.config import DataConfig
from disent.data.prepare import PrepareOptions, prepare


def tiny_arrays(n=120, classes=3, size=8, channels=1, seed=0, factors=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    shape = (n, size, size) if channels == 1 else (n, size, size, channels)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    # Encode the index in the first pixels so tests can tell samples apart.
    flat = images.reshape(n, -1)
    flat[:, 0] = np.arange(n) % 256
    flat[:, 1] = np.arange(n) // 256
    fac = rng.uniform(size=(n, factors)).astype(np.float32)
    return images, labels.astype(np.int64), fac


def make_npz(path: Path, n=120, classes=3, size=8, channels=1, factors=2, seed=0, **extra) -> Path:
    images, labels, fac = tiny_arrays(n, classes, size, channels, seed, factors)
    arrays = {"images": images, "labels": labels, **extra}
    if factors:
        arrays["factors"] = fac
        arrays["factor_names"] = np.array([f"f{i}" for i in range(factors)])
    np.savez(path, **arrays)
    return path


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def make_idx_dir(d: Path, n_train=100, n_test=40, classes=4, size=8, gz=True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels, _ = tiny_arrays(n, classes, size, 1, seed)
        for kind, arr, idx in (("images", images, 3), ("labels", labels, 1)):
            name = f"{prefix}-{kind}-idx{idx}-ubyte"
            data = _idx_bytes(arr)
            if gz:
                (d / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (d / name).write_bytes(data)
    return d


def make_folder(d: Path, per_class=(12, 10, 9), size=28, colour=True) -> Path:
    from PIL import Image

    rng = np.random.default_rng(3)
    for c, n in enumerate(per_class):
        cdir = d / f"class_{c}"
        cdir.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size, size, 3) if colour else (size, size)
            Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(cdir / f"img{i:03d}.png")
    return d


# --------------------------------------------------------------------------- small shards for the stream tests


N_CLASSES = 4


def prepare_shards(tmp: Path, n: int, groups_per_shard: int, seed: int = 0) -> Path:
    """Shards of n 8x8x1 samples (4 classes, 2 factors) in groups of 4, 10% of them test: tmp/data."""
    src = make_npz(tmp / "src.npz", n=n, classes=N_CLASSES, size=8, factors=2, seed=seed)
    out = tmp / "data"
    prepare(f"npz:{src}", str(out), PrepareOptions(group_size=4, groups_per_shard=groups_per_shard,
                                                   val_fraction=0.0, test_fraction=0.1, progress=False),
            echo=lambda s: None)
    return out


def cfg_for(url, **kw) -> DataConfig:
    """The data config that reads prepare_shards' shards, with `kw` changed."""
    base = dict(url=str(url), image_size=8, channels=1, num_classes=N_CLASSES, shuffle_buffer=64, num_workers=0,
                prefetch_factor=2)
    base.update(kw)
    return DataConfig(**base)


def iter_groups(data_cfg, split: str):
    """Every group of a split, shards in manifest order (no pairing, no shuffling): what the shards hold, read
    through the product's own reader."""
    from disent.data.reading import open_split, read_shards

    manifest = open_split(data_cfg, split)
    for _, groups in read_shards(data_cfg, manifest, range(len(manifest.shards))):
        yield from groups
