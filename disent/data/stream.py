"""Streaming same-class pairs from prepared shards (local or S3) to training batches.

Every batch is a dict of torch tensors::

    x1, x1p, x2, x2p   uint8   [B, C, H, W]   x1/x1p share a class; so do x2/x2p
    y1, y2             int64   [B]            classes of the two pairs
    f1, f1p, f2, f2p   float32 [B, F]         factors of each image (F = 0 when unknown)
    (with with_ids=True also id1, id1p, id2, id2p: int64 [B], each image's index in its source)

How batches are made (see docs/data.md for the full account):

* Epoch ``e`` has a shard order shared by every rank: a permutation seeded by (seed, e).
* There are ``S = world_size * W`` slots, one per (rank, DataLoader worker) (``W`` = max(1,
  num_workers)). Slot ``s`` reads shards ``order[s], order[s+S], order[s+2S], ...`` cyclically
  (wrapping around), so a slot never runs dry, whatever the number or size of shards.
* A slot keeps a per-class pool of samples (``data.shuffle_buffer`` groups worth, capped by the
  slot's share of the split) refilled from its shard sequence. ``(x1, x1')`` are two distinct
  samples drawn at random from one class's pool (class chosen in proportion to its pool size)
  and removed from it, so pairs cross group boundaries and change from epoch to epoch;
  ``(x2, x2')`` are drawn the same way with an independent random stream and not removed. A
  batch is drawn at once, with numpy (``_SlotStream``, ``_Store``).
* Rank ``r`` yields exactly ``batches_per_epoch = max(1, (N // 2) // (B * world_size))`` batches
  per epoch (``N`` = samples in the split): batch ``k`` of a rank (counted from the first epoch)
  belongs to epoch ``k // P`` and is made by the slot of worker ``k mod W``. Equal counts on every
  rank mean DDP/DeepSpeed collectives never wait for a rank that ran out of data.

Resume guarantee: ``state_dict()`` records how many batches the *consumer* took (``epoch``,
``batch``). A loader built with the same manifest (same digest), seed, batch size, world size
and ``num_workers`` that loads this state yields, from its next batch on, exactly the batches
the original loader would have yielded next (bit-identical), because every batch is a pure
function of (seed, rank, epoch, slot, position). Work that was prefetched but not consumed is
redone, not lost. Loaded with different settings, the loader continues at the same epoch and
batch number (the epoch still has exactly ``batches_per_epoch`` batches) but the sample order
differs. Exactness also assumes shards read the same way: with ``on_error: skip`` a shard that
fails in one run and not in the other changes what follows.
"""
from __future__ import annotations

import atexit
import logging
import os
import time
import warnings
import weakref
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from disent.config import ConfigError, DataConfig
from disent.data.errors import DataError, ShardError
from disent.data.manifest import Manifest, read_manifest
from disent.data.shards import Group, read_shard
from disent.signals import stop_signals_held

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- config checks


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


def open_split(data_cfg: DataConfig, split: str) -> Manifest:
    manifest = read_manifest(data_cfg.url, split)
    check_manifest(manifest, data_cfg)
    return manifest


# --------------------------------------------------------------------------- shard reading with the error policy


class _ShardSource:
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


# --------------------------------------------------------------------------- one slot's batches


def _seed_int(*words: int) -> int:
    return int(np.random.SeedSequence([int(w) & 0xFFFFFFFF for w in words]).generate_state(2, np.uint64)[0])


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The shard order of an epoch, the same on every rank and worker."""
    return np.random.default_rng(_seed_int(seed, epoch, 0x5A4D)).permutation(num_shards)


class _SlotStream:
    """Batches of one slot for one epoch: an infinite, deterministic generator of pair batches.

    The samples read and not yet drawn as x1/x1' sit in one contiguous store (:class:`_Store`), and
    each class keeps a shuffled queue of its samples' places there: drawing a same-class pair without
    replacement is taking the next two of its queue. A whole batch is drawn at once with a few numpy
    calls (classes in proportion to their pool sizes), so the cost per pair is not per-sample Python.
    """

    def __init__(self, manifest: Manifest, source: _ShardSource, batch_size: int, shuffle_buffer: int,
                 seed: int, epoch: int, slot: int, num_slots: int, with_ids: bool):
        self.manifest = manifest
        self.source = source
        self.batch_size = batch_size
        self.with_ids = with_ids
        self.order = epoch_shard_order(len(manifest.shards), seed, epoch)
        self.slot, self.num_slots = slot, num_slots
        self.next_in_sequence = 0
        self.rng1 = np.random.default_rng(_seed_int(seed, epoch, slot, 1))  # (x1, x1') draws
        self.rng2 = np.random.default_rng(_seed_int(seed, epoch, slot, 2))  # (x2, x2') draws: independent
        share = max(2, manifest.num_samples // (2 * num_slots))
        self.target = max(2 * batch_size, min(shuffle_buffer * manifest.group_size, share))
        self.queues = [np.empty(0, np.int64) for _ in range(manifest.num_classes)]  # store places, shuffled
        self.store = _Store(manifest.image_shape, len(manifest.factor_names))
        self.stalled = 0  # shards read in a row that added no sample

    def sizes(self) -> np.ndarray:
        return np.array([len(q) for q in self.queues], np.int64)

    def _next_shard(self) -> None:
        n = len(self.order)
        while True:
            index = int(self.order[(self.slot + self.next_in_sequence * self.num_slots) % n])
            self.next_in_sequence += 1
            groups = self.source.read(index)
            if groups:
                break
        if self.store.needs_room(sum(len(g.ids) for g in groups)):
            remap = self.store.compact(np.concatenate(self.queues))
            self.queues = [remap[q] for q in self.queues]
        places = self.store.add(groups)
        labels = self.store.labels[places]
        for c in np.unique(labels):
            new = places[labels == c]
            # a shard read twice in one epoch (tiny splits) must not put a sample in the pool twice
            new = new[~np.isin(self.store.ids[new], self.store.ids[self.queues[c]])]
            self.queues[c] = self.rng1.permutation(np.concatenate([self.queues[c], new]))

    def _read_more(self) -> None:
        """Read the next shard; a whole cycle of shards that adds nothing means the split cannot serve."""
        before = int(self.sizes().sum())
        self._next_shard()
        self.stalled = 0 if self.sizes().sum() > before else self.stalled + 1
        if self.stalled > len(self.order):
            raise DataError(
                f"{self.manifest.url}: the samples this loader slot reads ({before}) cannot fill batches of "
                f"{self.batch_size} same-class pairs; use a smaller batch per rank, fewer ranks or loader workers, "
                "or more data"
            )

    def _classes(self, rng: np.random.Generator, need_two_each: bool) -> np.ndarray:
        """batch_size class draws in proportion to pool size; with need_two_each, every class drawn k times
        holds 2k samples (redrawn a few times, then more is read)."""
        while True:
            sizes = self.sizes().astype(np.float64)
            sizes[sizes < 2] = 0
            for _ in range(8 if sizes.sum() > 0 else 0):
                picks = rng.choice(len(sizes), size=self.batch_size, p=sizes / sizes.sum())
                if not need_two_each or np.all(2 * np.bincount(picks, minlength=len(sizes)) <= sizes):
                    return picks
            self._read_more()

    def refs(self) -> np.ndarray:
        """The next batch as places in the store (no pixels copied): [4, B] for x1, x1', x2, x2'."""
        while self.sizes().sum() < self.target and self.stalled <= len(self.order) // 2:
            self._read_more()
        picks1 = self._classes(self.rng1, need_two_each=True)
        picks2 = self._classes(self.rng2, need_two_each=False)  # every read happens before any draw
        out = np.empty((4, self.batch_size), np.int64)
        # x2, x2': two distinct samples of the class, left in the pool
        sizes = self.sizes()
        flat, starts = np.concatenate(self.queues), np.cumsum(sizes) - sizes
        n = sizes[picks2]
        a = (self.rng2.random(self.batch_size) * n).astype(np.int64)
        b = (self.rng2.random(self.batch_size) * (n - 1)).astype(np.int64)
        b += b >= a
        out[2], out[3] = flat[starts[picks2] + a], flat[starts[picks2] + b]
        # x1, x1': the next two of the class's shuffled queue, taken out of the pool
        counts = np.bincount(picks1, minlength=len(self.queues))
        taken = []
        for c in np.flatnonzero(counts):
            taken.append(self.queues[c][: 2 * counts[c]])
            self.queues[c] = self.queues[c][2 * counts[c]:]
        rows = np.argsort(picks1, kind="stable")  # the batch rows of class 0's draws, then class 1's, ...
        pairs = np.concatenate(taken).reshape(-1, 2)
        out[0, rows], out[1, rows] = pairs[:, 0], pairs[:, 1]
        return out

    def assemble(self, refs: np.ndarray) -> dict[str, np.ndarray]:
        """Packed arrays (few large tensors cross the worker boundary cheaply); PairLoader unpacks
        them into x1, x1p, ... views."""
        out = {"x": self.store.images[refs], "f": self.store.factors[refs], "y": self.store.labels[refs[[0, 2]]]}
        if self.with_ids:
            out["id"] = self.store.ids[refs]
        return out


class _Store:
    """The samples of a slot's pool in contiguous arrays (one fancy index gathers a batch). Rows of drawn
    samples are reclaimed by compaction when new ones do not fit: the live rows move to the front."""

    def __init__(self, image_shape: tuple[int, ...], num_factors: int):
        self.image_shape, self.num_factors = tuple(image_shape), num_factors
        self.size = 0
        self._allocate(0)

    FIELDS = ("images", "factors", "ids", "labels")

    def _allocate(self, capacity: int) -> None:
        self.images = np.empty((capacity, *self.image_shape), np.uint8)
        self.factors = np.empty((capacity, self.num_factors), np.float32)
        self.ids = np.empty(capacity, np.int64)
        self.labels = np.empty(capacity, np.int64)

    def _keep(self, rows: np.ndarray, capacity: int) -> None:
        """Only `rows` (in that order) stay, at the front of new arrays of `capacity` rows."""
        kept = [getattr(self, field)[rows] for field in self.FIELDS]
        self._allocate(capacity)
        for field, values in zip(self.FIELDS, kept):
            getattr(self, field)[: len(rows)] = values
        self.size = len(rows)

    def needs_room(self, count: int) -> bool:
        return self.size + count > len(self.ids)

    def compact(self, live: np.ndarray) -> np.ndarray:
        """Keep only the rows `live` (in that order), with room for as many again; returns old -> new row."""
        remap = np.full(self.size, -1, np.int64)
        remap[live] = np.arange(len(live))
        self._keep(live, max(2 * len(live), 4096))
        return remap

    def add(self, groups: list[Group]) -> np.ndarray:
        count = sum(len(g.ids) for g in groups)
        if self.needs_room(count):  # still no room after compaction: grow
            self._keep(np.arange(self.size), 2 * (self.size + count))
        start = self.size
        for g in groups:
            k = len(g.ids)
            at = slice(self.size, self.size + k)
            self.images[at], self.factors[at], self.ids[at], self.labels[at] = g.images, g.factors, g.ids, g.label
            self.size += k
        return np.arange(start, self.size, dtype=np.int64)


_NAMES = (("x1", "f1", "id1"), ("x1p", "f1p", "id1p"), ("x2", "f2", "id2"), ("x2p", "f2p", "id2p"))


def unpack(packed: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for col, (x, f, i) in enumerate(_NAMES):
        out[x] = packed["x"][col]
        out[f] = packed["f"][col]
        if "id" in packed:
            out[i] = packed["id"][col]
    out["y1"], out["y2"] = packed["y"][0], packed["y"][1]
    return out


# --------------------------------------------------------------------------- the torch dataset


def _ordinal(k: int, epoch_start: int, virtual_worker: int, workers: int) -> int:
    """Position of global batch k among the batches of virtual_worker in its epoch."""
    first = epoch_start + ((virtual_worker - epoch_start) % workers)
    return (k - first) // workers


class _PairDataset:
    """What each DataLoader worker (or the main process, with 0 workers) iterates."""

    def __init__(self, manifest: Manifest, data_cfg: DataConfig, batch_size: int, rank: int, world_size: int,
                 seed: int, workers: int, batches_per_epoch: int, start: int, with_ids: bool):
        self.manifest = manifest
        self.cfg = data_cfg
        self.batch_size = batch_size
        self.rank, self.world = rank, world_size
        self.seed = seed
        self.workers = max(1, workers)
        self.batches_per_epoch = batches_per_epoch
        self.start = start
        self.with_ids = with_ids

    def batches(self, worker: int) -> Iterator[dict[str, Any]]:
        workers, per_epoch = self.workers, self.batches_per_epoch
        # The worker of the uninterrupted run that made these batches (a resume may start mid-cycle).
        virtual_worker = (worker + self.start) % workers
        slot = self.rank * workers + virtual_worker
        source = _ShardSource(self.manifest, self.cfg.on_error, self.cfg.verify_checksums)
        k = self.start + worker
        while True:
            epoch = k // per_epoch
            stream = _SlotStream(self.manifest, source, self.batch_size, self.cfg.shuffle_buffer, self.seed, epoch, slot,
                                 self.world * workers, self.with_ids)
            for _ in range(_ordinal(k, epoch * per_epoch, virtual_worker, workers)):  # fast-forward (resume): draw, do not copy pixels
                stream.refs()
            while k < (epoch + 1) * per_epoch:
                batch = stream.assemble(stream.refs())
                batch["_k"] = k
                batch["_worker"] = worker
                batch["_skipped"] = source.skipped
                batch["_first_error"] = source.first_error
                yield batch
                k += workers


class _PairIterable(IterableDataset):
    """The torch face of _PairDataset (module level, so spawn/forkserver workers can pickle it)."""

    def __init__(self, inner: _PairDataset):
        self.inner = inner

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        for batch in self.inner.batches(worker):
            yield {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in batch.items()}


def _worker_context() -> str | None:
    """DataLoader workers are forked on Linux (fast start, no re-import), whatever the process's
    own default (spawned ranks default to spawn; Python 3.14 to forkserver). DISENT_DATA_MP_CONTEXT
    overrides it."""
    import multiprocessing
    import os
    import sys

    wanted = os.environ.get("DISENT_DATA_MP_CONTEXT")
    if wanted:
        return wanted
    if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
        return "fork"
    return None


def resolve_num_workers(setting: int | str) -> int:
    """``data.num_workers``; ``auto`` gives a rank one worker per core it has beyond its own, at most
    4, and none when the ranks fill the machine's cores: a worker that competes with a rank for a
    core delays that rank at every all-reduce by more than the decoding it takes over (README,
    Benchmarks). A rank's cores: ``DISENT_CPUS_PER_RANK`` (the launcher's share, Slurm's
    --cpus-per-task), else the usable CPUs divided by ``LOCAL_WORLD_SIZE``. Thread limits such as
    OMP_NUM_THREADS do not count: they leave the other cores free for workers."""
    if setting != "auto":
        return int(setting)
    from disent.host import available_cpus

    def positive(name: str) -> int | None:
        value = os.environ.get(name, "")
        return int(value) if value.isdigit() and int(value) > 0 else None

    cores = positive("DISENT_CPUS_PER_RANK") or available_cpus() // (positive("LOCAL_WORLD_SIZE") or 1)
    return max(0, min(4, cores - 1))


# Loaders whose workers may be running. Because the workers block SIGTERM (disent.signals), multiprocessing's exit
# hook (terminate, then join, every daemonic child) would wait on them forever; this hook, registered
# after it and so run before it, stops them first.
_loaders_with_workers: weakref.WeakSet[PairLoader] = weakref.WeakSet()


@atexit.register
def _close_loaders_at_exit() -> None:
    for loader in list(_loaders_with_workers):
        loader.close()


class PairLoader:
    """Batches of same-class pairs, forever (epoch after epoch), equal in number on every rank.

    Args:
        data_cfg: the ``data`` section of the config.
        split: which split's manifest to read (``data.train_split`` for training).
        batch_size: pairs per batch on this rank (the micro batch).
        rank, world_size: this process's place among the data-parallel ranks.
        seed: seeds shard order, pairing and sampling (use the run's seed).
        with_ids: also yield id1, id1p, id2, id2p (each image's index in its source).

    Iterating continues from the current position; ``state_dict()``/``load_state_dict()``
    save and restore it (see the module docstring for the exact guarantee).
    """

    def __init__(self, data_cfg: DataConfig, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, with_ids: bool = False):
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside 0..{world_size - 1}")
        if data_cfg.on_error not in ("raise", "skip"):
            raise ConfigError(f"config key 'data.on_error' must be 'raise' or 'skip', got {data_cfg.on_error!r}")
        self.data_cfg = data_cfg
        self.split = split
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.with_ids = with_ids
        self.num_workers = resolve_num_workers(data_cfg.num_workers)
        self.manifest = open_split(data_cfg, split)
        self.batches_per_epoch = max(1, (self.manifest.num_samples // 2) // (batch_size * world_size))
        self.wait_seconds = 0.0
        self._k = 0  # batches consumed so far, across epochs
        self._iter: Iterator | None = None
        self._loader = None
        self._skipped_by_worker: dict[int, int] = {}
        self._warned = False

    # -- counters the trainer logs
    @property
    def skipped_shards(self) -> int:
        """Shards skipped (data.on_error=skip) so far, summed over this rank's workers."""
        return sum(self._skipped_by_worker.values())

    @property
    def epoch(self) -> int:
        return self._k // self.batches_per_epoch

    @property
    def digest(self) -> str:
        return self.manifest.digest

    # -- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self._k // self.batches_per_epoch,
            "batch": self._k % self.batches_per_epoch,
            "seed": self.seed,
            "batches_per_epoch": self.batches_per_epoch,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "manifest_digest": self.manifest.digest,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, batch = int(state["epoch"]), int(state["batch"])
        same = (state.get("seed", self.seed) == self.seed
                and state.get("batches_per_epoch", self.batches_per_epoch) == self.batches_per_epoch
                and state.get("world_size", self.world_size) == self.world_size
                and state.get("num_workers", self.num_workers) == self.num_workers
                and state.get("manifest_digest", self.manifest.digest) == self.manifest.digest)
        if not same:
            log.warning("data loader state was saved with other settings (seed, batch size, world size, workers "
                        "or data); resuming at epoch %d batch %d, but the sample order will differ", epoch, batch)
        batch = min(batch, self.batches_per_epoch)
        self._k = epoch * self.batches_per_epoch + batch
        self.close()

    # -- iteration
    def _start(self) -> None:
        workers = self.num_workers
        ds = _PairDataset(self.manifest, self.data_cfg, self.batch_size, self.rank, self.world_size, self.seed,
                          workers, self.batches_per_epoch, self._k, self.with_ids)
        kwargs: dict[str, Any] = {}
        if workers > 0:
            kwargs.update(prefetch_factor=self.data_cfg.prefetch_factor, persistent_workers=True,
                          multiprocessing_context=_worker_context())
        self._loader = DataLoader(_PairIterable(ds), batch_size=None, num_workers=workers,
                                  pin_memory=torch.cuda.is_available(), **kwargs)
        with stop_signals_held():  # the workers start here and leave preemption to the trainer
            self._iter = iter(self._loader)
        if workers > 0:
            _loaders_with_workers.add(self)

    def close(self) -> None:
        """Stop the worker processes (iteration restarts them where it left off)."""
        it, self._iter, self._loader = self._iter, None, None
        _loaders_with_workers.discard(self)
        if it is None or not hasattr(it, "_shutdown_workers"):
            return
        it._shutdown_workers()
        # torch ends a worker that does not stop in time with SIGTERM, which ours block.
        for worker in it._workers:
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self.next()

    def __next__(self) -> dict[str, Any]:
        return self.next()

    def next(self) -> dict[str, Any]:
        if self._iter is None:
            self._start()
        t0 = time.perf_counter()
        try:
            batch = next(self._iter)  # type: ignore[arg-type]
        except ShardError as exc:
            raise _as_raised_in_worker(exc) from None
        self.wait_seconds += time.perf_counter() - t0
        k = batch.pop("_k")
        k = int(k)
        if k != self._k:  # cannot happen with in-order DataLoader; guards the resume arithmetic
            raise RuntimeError(f"data loader produced batch {k} where {self._k} was expected")
        worker = int(batch.pop("_worker"))
        skipped = int(batch.pop("_skipped"))
        first_error = batch.pop("_first_error")
        batch = unpack(batch)
        self._skipped_by_worker[worker] = max(skipped, self._skipped_by_worker.get(worker, 0))
        if skipped and not self._warned:
            self._warned = True
            warnings.warn(f"data.on_error=skip: skipped a bad shard: {first_error}. Further skipped shards are "
                          "only counted (PairLoader.skipped_shards).", RuntimeWarning, stacklevel=2)
        self._k += 1
        return batch

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def _as_raised_in_worker(exc: ShardError) -> ShardError:
    """A DataLoader worker's exception arrives rebuilt around the worker's whole traceback; keep the
    original one-line message, which names the shard."""
    text = str(exc)
    if "Original Traceback" not in text:
        return exc
    last = [line for line in text.splitlines() if line.strip()][-1]
    name, _, rest = last.partition(": ")  # "disent.data.errors.ShardError: shard ..."
    message = rest if rest and name.rsplit(".", 1)[-1] == type(exc).__name__ else last
    shard = message.split()[1].rstrip(":") if message.startswith("shard ") else ""
    return type(exc)(message, shard)


# --------------------------------------------------------------------------- sequential reading for evaluation


def iter_groups(data_cfg: DataConfig, split: str, manifest: Manifest | None = None) -> Iterator[Group]:
    """Every group of a split, shards in manifest order (no pairing, no shuffling)."""
    manifest = manifest or open_split(data_cfg, split)
    source = _ShardSource(manifest, data_cfg.on_error, data_cfg.verify_checksums)
    for index in range(len(manifest.shards)):
        groups = source.read(index)
        if groups is None:
            if source.skipped == 1:
                warnings.warn(f"data.on_error=skip: skipped a bad shard: {source.first_error}", RuntimeWarning,
                              stacklevel=2)
            continue
        yield from groups


def load_split_arrays(data_cfg: DataConfig, split: str, limit: int | None = None, manifest: Manifest | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(images uint8 [N,C,H,W], labels int64 [N], factors float32 [N,F], factor_names), N <= limit.

    Groups of all classes are shuffled across shards at prepare time, so the first ``limit``
    samples are a class-mixed subset, the same on every call.
    """
    manifest = manifest or open_split(data_cfg, split)
    images, labels, factors = [], [], []
    n = 0
    for g in iter_groups(data_cfg, split, manifest):
        take = len(g.ids) if limit is None else min(len(g.ids), limit - n)
        if take <= 0:
            break
        images.append(g.images[:take])
        labels.append(np.full(take, g.label, np.int64))
        factors.append(g.factors[:take])
        n += take
        if limit is not None and n >= limit:
            break
    C, H, W = manifest.image_shape
    F = len(manifest.factor_names)
    if not images:
        return (np.zeros((0, C, H, W), np.uint8), np.zeros(0, np.int64), np.zeros((0, F), np.float32),
                list(manifest.factor_names))
    return np.concatenate(images), np.concatenate(labels), np.concatenate(factors), list(manifest.factor_names)
