"""Reading prepared data: a split's manifest checked against the config, shards read under
`data.on_error`, and whole splits for evaluation (sequential, no pairing)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from disent.config import ConfigError, DataConfig
from disent.data.errors import DataError, ShardError
from disent.data.manifest import Manifest, read_manifest
from disent.data.shards import Group, read_shard


def check_manifest(manifest: Manifest, data_cfg: DataConfig) -> None:
    """The manifest must describe the images and classes the config (and so the model) expects."""
    c, h, w = manifest.image_shape
    problems = []
    if h != data_cfg.image_size or w != data_cfg.image_size:
        problems.append(f"data.image_size={data_cfg.image_size} but the images are {h}x{w}")
    if c != data_cfg.channels:
        problems.append(f"data.channels={data_cfg.channels} but the images have {c} channel(s)")
    if manifest.num_classes != data_cfg.num_classes:
        problems.append(f"data.num_classes={data_cfg.num_classes} but the data has {manifest.num_classes} classes")
    if problems:
        raise ConfigError(
            f"the config does not match the prepared data in {manifest.url}: {'; '.join(problems)}. "
            f"Set data.image_size={h} data.channels={c} data.num_classes={manifest.num_classes}, "
            "or point data.url at data prepared for this config"
        )
    if manifest.num_samples < 2 or not manifest.shards:
        raise DataError(f"{manifest.url} lists no samples; re-run `disent prepare`")
    check_counts(manifest)


def check_counts(manifest: Manifest) -> None:
    """The manifest agrees with itself: its shards' samples and class counts add up to its own."""
    redo = "; the manifest was edited or the data changed: re-run `disent prepare`"
    if sum(s.samples for s in manifest.shards) != manifest.num_samples:
        raise DataError(f"{manifest.url}: its shards hold {sum(s.samples for s in manifest.shards)} samples, but it "
                        f"says num_samples {manifest.num_samples}{redo}")
    for shard in manifest.shards:
        if shard.class_counts and sum(shard.class_counts) != shard.samples:
            raise DataError(f"{manifest.url}: shard {shard.name} counts {sum(shard.class_counts)} samples by class but "
                            f"{shard.samples} in all{redo}")
    if manifest.class_counts and all(s.class_counts for s in manifest.shards):
        summed = np.sum([s.class_counts for s in manifest.shards], axis=0).tolist()
        if summed != list(manifest.class_counts):
            raise DataError(f"{manifest.url}: its class_counts {list(manifest.class_counts)} disagree with its shards' "
                            f"{summed}{redo}")


def check_local_shards(manifest: Manifest) -> None:
    """Local shards exist at the size their manifest gives, checked before the run starts: local data that is wrong
    stays wrong, so it is an input error (exit 2), not a failure to retry. Shards on S3 are read as they come (a
    read error there may pass: exit 69)."""
    for shard in manifest.shards:
        if shard.url.startswith("s3://"):
            return
        try:
            size = Path(shard.url).stat().st_size
        except FileNotFoundError:
            raise DataError(f"shard {shard.url} is missing; the data at {manifest.url} is incomplete: restore it or "
                            "re-run `disent prepare`") from None
        if size != shard.bytes:
            raise DataError(f"shard {shard.url} is {size} bytes where its manifest says {shard.bytes} "
                            "(truncated or replaced): restore it or re-run `disent prepare`")


def open_split(data_cfg: DataConfig, split: str) -> Manifest:
    manifest = read_manifest(data_cfg.url, split)
    check_manifest(manifest, data_cfg)
    if data_cfg.on_error == "raise":  # with skip, a bad shard is skipped when it is read (and warned about)
        check_local_shards(manifest)
    return manifest


class ShardSource:
    """Reads shards, applying data.on_error; counts skipped shards."""

    def __init__(self, manifest: Manifest, on_error: str, verify: bool):
        self.manifest = manifest
        self.on_error = on_error
        self.verify = verify
        self.skipped = 0
        self.first_error: str = ""
        self._failed_in_a_row = 0

    def read(self, index: int) -> list[Group] | None:
        info = self.manifest.shards[index]
        try:
            groups = read_shard(info, self.manifest, self.verify)
        except ShardError as exc:
            if self.on_error == "raise":
                raise
            self.skipped += 1
            self.first_error = self.first_error or str(exc)
            self._failed_in_a_row += 1
            if self._failed_in_a_row >= max(len(self.manifest.shards), 1):
                raise ShardError(f"every shard of {self.manifest.url} failed in a row (data.on_error=skip "
                                 f"cannot go on); the first error: {self.first_error}", info.url) from None
            return None
        self._failed_in_a_row = 0
        return groups


def read_shards(data_cfg: DataConfig, manifest: Manifest, indices) -> Iterator[tuple[int, list[Group]]]:
    """(index, groups) of these shards in order, under data.on_error; a skipped shard is left out and the
    first one warned about."""
    source = ShardSource(manifest, data_cfg.on_error, data_cfg.verify_checksums)
    for index in indices:
        groups = source.read(index)
        if groups is None:
            if source.skipped == 1:
                warnings.warn(f"data.on_error=skip: skipped a bad shard: {source.first_error}", RuntimeWarning,
                              stacklevel=3)
            continue
        yield index, groups


def load_split_arrays(data_cfg: DataConfig, split: str, limit: int | None = None, manifest: Manifest | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(images uint8 [N,C,H,W], labels int64 [N], factors float32 [N,F], factor_names), N <= limit.

    With a limit smaller than the split: a uniform random subset (seeded, the same on every call, in
    split order), chosen from the manifest's counts before reading, so memory holds only the subset and
    shards holding none of it are not read. A prefix would hold only the few classes of its first
    records, because a record is a large group of one class.
    """
    manifest = manifest or open_split(data_cfg, split)
    counts = [info.samples for info in manifest.shards]
    starts = np.cumsum([0, *counts])
    chosen = None
    if limit is not None and limit < starts[-1]:
        chosen = np.sort(np.random.default_rng(0x5EED).choice(int(starts[-1]), size=max(0, limit), replace=False))
    def local(index: int) -> np.ndarray:
        return chosen[(chosen >= starts[index]) & (chosen < starts[index + 1])] - starts[index]

    wanted = [i for i in range(len(manifest.shards)) if chosen is None or len(local(i))]
    images, labels, factors = [], [], []
    for index, groups in read_shards(data_cfg, manifest, wanted):
        shard_images = np.concatenate([g.images for g in groups])
        shard_labels = np.concatenate([np.full(len(g.ids), g.label, np.int64) for g in groups])
        shard_factors = np.concatenate([g.factors for g in groups])
        keep = slice(None) if chosen is None else local(index)
        images.append(shard_images[keep])
        labels.append(shard_labels[keep])
        factors.append(shard_factors[keep])
    C, H, W = manifest.image_shape
    F = len(manifest.factor_names)
    if not images:
        return (np.zeros((0, C, H, W), np.uint8), np.zeros(0, np.int64), np.zeros((0, F), np.float32),
                list(manifest.factor_names))
    return np.concatenate(images), np.concatenate(labels), np.concatenate(factors), list(manifest.factor_names)
