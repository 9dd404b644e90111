"""`disent prepare`: a source -> pre-grouped WebDataset shards + one manifest per split.

Record layout (one WebDataset sample = one group of same-class samples):

    g00000042.cls          class id, ASCII
    g00000042.images.npy   uint8 [k, C, H, W]   (raw pixels: decoding is a header parse + memcpy)
    g00000042.ids.npy      int64 [k]            index of each sample in its source part
    g00000042.factors.npy  float32 [k, F]       only when the source knows its factors (F > 0)

Groups of all classes are shuffled across shards (seeded). Shards are plain, uncompressed tar
files named ``shard-000000.tar`` in ``OUT/<split>/``; each split's ``manifest.json`` is written
after all shards of all splits are complete. With ``--overwrite`` the old manifests are removed
first, so at every moment each split either has no manifest or a manifest whose shards are all
complete; without it, an existing manifest makes prepare refuse before doing any work.
"""
from __future__ import annotations

import errno
import hashlib
import io
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import webdataset as wds
from tqdm import tqdm

from disent.data.errors import DataError
from disent.data.manifest import FORMAT, MANIFEST_NAME, Manifest, ShardInfo, manifest_url
from disent.data.sources import Part, SourceData, SourceOptions, load_source
from disent.errors import InputError
from disent.io import storage

SPLITS = ("train", "val", "test")
SHARD_PATTERN = "shard-{:06d}.tar"


@dataclass
class PrepareOptions:
    group_size: int = 256  # large records: a tar member's header is read once per 256 samples
    groups_per_shard: int = 8
    val_fraction: float = 0.1
    test_fraction: float = 0.1  # only when the source provides no test set
    seed: int = 0
    overwrite: bool = False
    progress: bool = True


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


# --------------------------------------------------------------------------- splits and groups


def _carve_counts(n: int, fraction: float) -> int:
    """How many of a class's n samples go to a carved split: 0 or >= 2, leaving >= 2 behind."""
    if fraction <= 0:
        return 0
    take = int(round(n * fraction))
    if take == 1:
        take = 2
    if n - take < 2:
        take = n - 2
    return take if take >= 2 else 0


def carve_splits(src: SourceData, opts: PrepareOptions) -> dict[str, Part]:
    """Stratified per class: val (and test, when the source has none) come out of train."""
    rng = np.random.default_rng([opts.seed, 1])
    labels = src.train.labels
    take = {"train": [], "val": [], "test": []}
    for c in range(src.num_classes):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = 0 if src.test is not None else _carve_counts(len(idx), opts.test_fraction)
        n_val = _carve_counts(len(idx) - n_test, opts.val_fraction)
        take["test"].append(idx[:n_test])
        take["val"].append(idx[n_test:n_test + n_val])
        take["train"].append(idx[n_test + n_val:])
    parts: dict[str, Part] = {}
    for split in SPLITS:
        if split == "test" and src.test is not None:
            parts["test"] = src.test
            continue
        sel = np.sort(np.concatenate(take[split]))
        if sel.size:
            p = src.train
            parts[split] = Part(p.images[sel], p.labels[sel], p.factors[sel], p.origin, ids=sel)
    for part in parts.values():
        if part.ids is None:
            part.ids = np.arange(len(part.labels))
    return parts


def make_groups(labels: np.ndarray, num_classes: int, group_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Index arrays of same-class groups (size group_size; a class's last group may be smaller),
    all classes shuffled together."""
    groups: list[np.ndarray] = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        groups.extend(idx[i:i + group_size] for i in range(0, len(idx), group_size))
    order = rng.permutation(len(groups))
    return [groups[i] for i in order]


# --------------------------------------------------------------------------- writing


def _shard_bytes(part: Part, ids: np.ndarray, groups: list[np.ndarray], first_group: int) -> bytes:
    buf = io.BytesIO()
    # encoder=False: we hand over bytes. mtime is a fixed *int* so the same seed gives byte-identical
    # shards and tarfile writes no per-member PAX header (a float mtime costs one extra header each).
    with wds.TarWriter(buf, encoder=False, mtime=0, mode=0o444) as writer:  # type: ignore[arg-type]
        for j, g in enumerate(groups):
            record = {
                "__key__": f"g{first_group + j:08d}",
                "cls": str(int(part.labels[g[0]])).encode(),
                "images.npy": npy_bytes(part.images[g]),
                "ids.npy": npy_bytes(ids[g].astype(np.int64)),
            }
            if part.factors.shape[1]:
                record["factors.npy"] = npy_bytes(part.factors[g].astype(np.float32))
            writer.write(record)
    return buf.getvalue()


def _existing_manifests(out: str) -> list[str]:
    return [manifest_url(out, s) for s in SPLITS if storage.exists(manifest_url(out, s))]


def _progress(total: int, enabled: bool):
    return tqdm(total=total, unit="group", desc="writing shards", disable=None if enabled else True, file=sys.stderr,
                dynamic_ncols=True)


def prepare(
    source: str,
    out: str,
    opts: PrepareOptions | None = None,
    source_opts: SourceOptions | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Manifest]:
    """Validate the source, write shards for train/val/test, then the manifests. Returns them by split."""
    opts = opts or PrepareOptions()
    source_opts = source_opts or SourceOptions(seed=opts.seed)
    _check_options(opts)
    existing = _refuse_existing(out, opts)  # before the expensive load

    t0 = time.time()
    src = load_source(source, source_opts)  # every input check happens here, before any write
    parts = carve_splits(src, opts)
    plans = {split: _plan_shards(part, src.num_classes, opts, SPLITS.index(split)) for split, part in parts.items()}

    # From here on we write. Old manifests go first: no manifest may ever name a shard being rewritten.
    for url in existing:
        storage.delete(url)
    total_groups = sum(len(g) for shards in plans.values() for g in shards)
    try:
        with _progress(total_groups, opts.progress) as bar:
            manifests = {split: _write_split(out, split, parts[split], shards, src, opts, bar)
                         for split, shards in plans.items()}
        _write_manifests(out, manifests)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise InputError(f"no space left on the device of {storage.describe(out)} while writing the shards: nothing "
                         "there counts as prepared (a split counts once its manifest is written); free space, or "
                         "choose another output, and run prepare again with --overwrite") from None
    _remove_stale(out, manifests)
    echo(summary(manifests, time.time() - t0))
    return manifests


def _check_options(opts: PrepareOptions) -> None:
    if opts.group_size < 1:
        raise DataError(f"--group-size must be >= 1, got {opts.group_size}")
    if opts.groups_per_shard < 1:
        raise DataError(f"--groups-per-shard must be >= 1, got {opts.groups_per_shard}")
    for name, value in (("--val-fraction", opts.val_fraction), ("--test-fraction", opts.test_fraction)):
        if not 0.0 <= value < 1.0:
            raise DataError(f"{name} must be in [0, 1), got {value}")


def _refuse_existing(out: str, opts: PrepareOptions) -> list[str]:
    """The manifests already in ``out``; refused unless --overwrite (then prepare removes them before writing)."""
    existing = _existing_manifests(out)
    if existing and not opts.overwrite:
        raise DataError(
            f"{storage.describe(out)} already holds prepared data ({', '.join(storage.describe(e) for e in existing)}); "
            "pass --overwrite to replace it, or choose another output location"
        )
    return existing


def _plan_shards(part: Part, num_classes: int, opts: PrepareOptions, split_index: int) -> list[list[np.ndarray]]:
    """The groups of one split, cut into shards of --groups-per-shard groups."""
    rng = np.random.default_rng([opts.seed, 2, split_index])
    groups = make_groups(part.labels, num_classes, opts.group_size, rng)
    return [groups[i:i + opts.groups_per_shard] for i in range(0, len(groups), opts.groups_per_shard)]


def _write_split(out: str, split: str, part: Part, shards: list[list[np.ndarray]], src: SourceData,
                 opts: PrepareOptions, bar) -> Manifest:
    """Write one split's shards; return its manifest (not yet written)."""
    split_url = storage.join(out, split)
    infos: list[ShardInfo] = []
    first = 0
    bar.set_description(f"writing {split}")
    for index, groups in enumerate(shards):
        data = _shard_bytes(part, part.ids, groups, first)
        name = SHARD_PATTERN.format(index)
        url = storage.join(split_url, name)
        storage.write_bytes_atomic(url, data)
        members = np.concatenate(groups)
        infos.append(ShardInfo(
            name=name, url=url, samples=int(members.size), groups=len(groups),
            class_counts=np.bincount(part.labels[members], minlength=src.num_classes).tolist(),
            bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
        ))
        first += len(groups)
        bar.update(len(groups))
    c, h, w = src.train.images.shape[1:]
    return Manifest(
        split=split, url=storage.describe(manifest_url(out, split)), shards=infos,
        image_shape=(int(c), int(h), int(w)), num_classes=src.num_classes,
        factor_names=list(src.factor_names), source=dict(src.description, **{
            "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "val_fraction": opts.val_fraction,
            "test_fraction": opts.test_fraction if src.test is None else None,
            "test_from": "source" if src.test is not None else "carved from train",
        }),
        group_size=opts.group_size, num_samples=int(len(part.labels)), num_groups=first,
        class_counts=np.bincount(part.labels, minlength=src.num_classes).tolist(),
        class_names=src.class_names, seed=opts.seed, format=FORMAT,
    )


def _write_manifests(out: str, manifests: dict[str, Manifest]) -> None:
    """Manifests last: each appears atomically (rename locally, one PUT on S3)."""
    for split, manifest in manifests.items():
        data = manifest.to_bytes()
        storage.write_bytes_atomic(manifest_url(out, split), data)
        manifest.digest = hashlib.sha256(data).hexdigest()


def _remove_stale(out: str, manifests: dict[str, Manifest]) -> None:
    """Shards from an earlier, larger prepare (or an interrupted one) that no manifest names."""
    for split in SPLITS:
        split_url = storage.join(out, split)
        keep = {s.name for s in manifests[split].shards} if split in manifests else set()
        for name in storage.list_names(split_url):
            if name == MANIFEST_NAME or name in keep:
                continue
            if (name.startswith("shard-") and name.endswith(".tar")) or (name.startswith(".shard-") and ".tmp-" in name):
                storage.delete(storage.join(split_url, name))


def summary(manifests: dict[str, Manifest], seconds: float | None = None) -> str:
    lines = []
    any_m = next(iter(manifests.values()))
    names = any_m.class_names or [str(i) for i in range(any_m.num_classes)]
    width = max(8, *(len(n) for n in names))
    header = f"{'class':<{width}} " + " ".join(f"{s:>8}" for s in manifests)
    lines.append(f"prepared {any_m.source.get('kind')} -> image shape {tuple(any_m.image_shape)}, "
                 f"{any_m.num_classes} classes, group size {any_m.group_size}"
                 + (f", factors {', '.join(any_m.factor_names)}" if any_m.factor_names else "")
                 + (f" in {seconds:.1f}s" if seconds is not None else ""))
    for split, m in manifests.items():
        mb = sum(s.bytes for s in m.shards) / 1e6
        lines.append(f"  {split:<5} {m.num_samples:>8} samples {m.num_groups:>7} groups {len(m.shards):>4} shards "
                     f"{mb:8.1f} MB  {m.url}")
    lines.append(header)
    for c, name in enumerate(names):
        lines.append(f"{name:<{width}} " + " ".join(f"{m.class_counts[c]:>8}" for m in manifests.values()))
    return "\n".join(lines)
