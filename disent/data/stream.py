"""Streaming same-class pairs from prepared shards (local or S3) to training batches.

Every batch is a dict of torch tensors::

    x1, x1p, x2, x2p   uint8   [B, C, H, W]   x1/x1p share a class; so do x2/x2p
    y1, y2             int64   [B]            classes of the two pairs
    f1, f1p, f2, f2p   float32 [B, F]         factors of each image (F = 0 when unknown)
    (with with_ids=True also id1, id1p, id2, id2p: int64 [B], each image's index in its source)

How batches are made (``disent.data.pairing`` defines the order; docs/data.md has the full account):

* An epoch's *global* batches (the rows of all ranks together) are made by ``data.streams``
  canonical streams, each with its own shards, pool and random streams; stream ``v`` fills the
  same rows of every global batch. Rank ``r`` takes rows ``[r*B, (r+1)*B)``; its DataLoader
  workers split its streams between them and each hands over its rows for a chunk of batches.
* Every rank yields exactly ``batches_per_epoch = max(1, (N // 2) // (B * world_size))`` batches
  per epoch (``N`` = samples in the split), so DDP/DeepSpeed collectives never wait for a rank
  that ran out of data.

Resume guarantee: ``state_dict()`` records the global position (``epoch``, ``batch``: batches the
*consumer* took) and what the order depends on. A loader with the same manifest (digest), seed,
global batch (``B * world_size``) and number of streams that loads this state yields, from its next
batch on, exactly the rows the original run would have yielded next, whatever the number of ranks
and workers now: the content of a global batch does not depend on them. Work that was prefetched
but not consumed is redone, not lost. Loaded with other settings, the loader continues at the same
epoch and batch number (the epoch still has exactly ``batches_per_epoch`` batches) but the sample
order differs. Exactness also assumes shards read the same way: with ``on_error: skip`` a shard
that fails in one run and not in the other changes what follows.
"""
from __future__ import annotations

import atexit
import collections
import logging
import multiprocessing
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
from disent.data.pairing import (PairStream, StreamCursor, StreamPart, draw_sizes, item_shapes, rank_parts,
                                 split_among_workers, take_rows)
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


# --------------------------------------------------------------------------- the torch dataset

ITEM_BYTES = 4 << 20  # pixels per item a worker hands over: fewer, larger transfers amortise the IPC


def unpack(packed: dict[str, Any]) -> list[dict[str, Any]]:
    """The batches of an item (arrays [4, batches, B, ...], [2, ...] for y) as dicts of named views:
    x1, x1p, ..., y1, y2."""
    columns: dict[str, Any] = {}
    for col, names in enumerate(_NAMES):
        for name, field in zip(names, ("x", "f", "id")):
            if field in packed:
                columns[name] = packed[field][col].unbind(0)
    columns["y1"], columns["y2"] = packed["y"][0].unbind(0), packed["y"][1].unbind(0)
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


_NAMES = (("x1", "f1", "id1"), ("x1p", "f1p", "id1p"), ("x2", "f2", "id2"), ("x2p", "f2p", "id2p"))


class _PairDataset:
    """What each DataLoader worker (or the main process, with 0 workers) iterates: items holding the
    rows of its streams for `chunk` consecutive batches (the rank's other workers hold the other rows
    of the same batches)."""

    def __init__(self, manifest: Manifest, data_cfg: DataConfig, parts_by_worker: list[list[StreamPart]],
                 num_streams: int, seed: int, batches_per_epoch: int, chunk: int, start: int, with_ids: bool):
        self.manifest = manifest
        self.cfg = data_cfg
        self.parts_by_worker = parts_by_worker
        self.num_streams = num_streams
        self.seed = seed
        self.batches_per_epoch = batches_per_epoch
        self.chunk = chunk
        self.start = start
        self.with_ids = with_ids
        self.draw, self.pool_target = draw_sizes(manifest.num_samples, num_streams, data_cfg.shuffle_buffer)

    def _cursors(self, parts: list[StreamPart], source: _ShardSource, epoch: int, batch: int,
                 before: list[StreamCursor]) -> list[StreamCursor]:
        cursors = []
        for i, part in enumerate(parts):
            stream = PairStream(self.manifest, source, self.pool_target, self.seed, epoch, part.stream,
                                self.num_streams, self.with_ids, before[i].stream.store if before else None)
            cursor = StreamCursor(stream, self.draw, self.batches_per_epoch * part.rows)
            cursor.skip(batch * part.rows)  # a resume mid-epoch: drawn again, pixels not copied
            cursors.append(cursor)
        return cursors

    def items(self, worker: int, handoff: _HandOff | None = None) -> Iterator[dict[str, Any]]:
        parts = self.parts_by_worker[worker]
        rows = sum(p.keep_to - p.keep_from for p in parts)
        source = _ShardSource(self.manifest, self.cfg.on_error, self.cfg.verify_checksums)
        k = self.start
        cursors: list[StreamCursor] = []
        while True:
            epoch, batch = divmod(k, self.batches_per_epoch)
            cursors = self._cursors(parts, source, epoch, batch, cursors)
            while batch < self.batches_per_epoch:
                count = min(self.chunk, self.batches_per_epoch - batch)
                shapes = item_shapes(self.manifest.image_shape, len(self.manifest.factor_names), count, rows,
                                     self.with_ids)
                tensors = handoff.next_slot(shapes) if handoff is not None else None
                slot = handoff.slot if handoff is not None else -1
                arrays = take_rows(cursors, parts, count, None if tensors is None else
                                   {name: t.numpy() for name, t in tensors.items()})
                item: dict[str, Any] = dict(tensors or arrays)
                item.update(_k=k, _count=count, _worker=worker, _slot=slot, _skipped=source.skipped,
                            _first_error=source.first_error)
                yield item
                batch += count
                k += count


class _PairIterable(IterableDataset):
    """The torch face of _PairDataset (module level, so spawn/forkserver workers can pickle it)."""

    def __init__(self, inner: _PairDataset, released=None, slots: int = 0):
        self.inner = inner
        self.released, self.slots = released, slots  # the workers' hand-off (None with no worker)

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        handoff = _HandOff(self.released, worker, self.slots) if info is not None and self.released is not None else None
        if handoff is not None:
            # slots go out by shared-memory name: the consumer maps each once and finds it in torch's cache
            # after that (the default, by file descriptor, costs a socket round trip per tensor and item)
            torch.multiprocessing.set_sharing_strategy("file_system")
        for item in self.inner.items(worker, handoff):
            yield {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in item.items()}


class _HandOff:
    """A worker's items go out in shared-memory slots that it reuses round robin. Torch sends a tensor that
    is already shared without copying it, so an item costs the worker no fresh shared memory (making it
    runs at about 1 GB/s: page faults and zeroing, the larger part of a worker's time for 64x64 colour
    images). The consumer copies each item out and then counts it in `released`; the worker writes
    into a slot only once the item that used it before is released."""

    def __init__(self, released, worker: int, slots: int):
        self.released, self.worker, self.slots = released, worker, slots
        self.sent = 0
        self.slot = -1  # the slot of the last item
        self._storage: dict[str, torch.Tensor] = {}

    def next_slot(self, shapes: dict[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, torch.Tensor]:
        slot = self.slot = self.sent % self.slots
        while self.released[self.worker] < self.sent - self.slots + 1:
            time.sleep(0.0005)  # rare: the consumer is more than `slots` items behind
        self.sent += 1
        out = {}
        for name, (shape, dtype) in shapes.items():
            numel = int(np.prod(shape))
            key = f"{name}{slot}"
            storage = self._storage.get(key)
            if storage is None or storage.numel() < numel:
                storage = self._storage[key] = torch.empty(numel, dtype=_TORCH_DTYPES[dtype]).share_memory_()
            out[name] = storage[:numel].view(shape)
        return out


_TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.float32): torch.float32, np.dtype(np.int64): torch.int64}


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
        self.global_batch = batch_size * world_size
        self.seed = seed
        self.with_ids = with_ids
        self.num_workers = resolve_num_workers(data_cfg.num_workers)
        self.manifest = open_split(data_cfg, split)
        self.num_streams = resolve_num_streams(data_cfg.streams, self.global_batch, world_size, self.num_workers,
                                               len(self.manifest.shards))
        self.batches_per_epoch = max(1, (self.manifest.num_samples // 2) // self.global_batch)
        self.wait_seconds = 0.0
        self._k = 0  # batches consumed so far, across epochs
        self._pending: collections.deque[dict[str, Any]] = collections.deque()  # batches of items received
        self._iter: Iterator | None = None
        self._loader = None
        self._item_sources = 1  # items per chunk of batches: one per worker that holds streams
        self._released = None  # per worker: items copied out of its hand-off slots
        self._slot_tensors: dict[tuple[int, int], dict] = {}
        self._pin = torch.cuda.is_available()
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
        """The global position (the same on every rank) and what the order depends on; world_size and
        num_workers are recorded for the log only."""
        return {
            "epoch": self._k // self.batches_per_epoch,
            "batch": self._k % self.batches_per_epoch,
            "seed": self.seed,
            "batches_per_epoch": self.batches_per_epoch,
            "global_batch": self.global_batch,
            "streams": self.num_streams,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "manifest_digest": self.manifest.digest,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, batch = int(state["epoch"]), int(state["batch"])
        saved_streams = state.get("streams")
        if saved_streams is not None and self.data_cfg.streams == "auto" and saved_streams <= self.global_batch:
            self.num_streams = int(saved_streams)  # the run's order was defined with these
        same = (saved_streams == self.num_streams
                and state.get("seed", self.seed) == self.seed
                and state.get("global_batch", self.global_batch) == self.global_batch
                and state.get("batches_per_epoch", self.batches_per_epoch) == self.batches_per_epoch
                and state.get("manifest_digest", self.manifest.digest) == self.manifest.digest)
        if not same:
            log.warning("data loader state was saved with another order (seed, global batch, data.streams, data or an "
                        "older loader): %s; resuming at epoch %d batch %d, but the sample order will differ",
                        {k: state.get(k) for k in ("seed", "global_batch", "streams", "manifest_digest")}, epoch, batch)
        batch = min(batch, self.batches_per_epoch)
        self._k = epoch * self.batches_per_epoch + batch
        self.close()

    # -- iteration
    def _chunk(self) -> int:
        """Batches per item: items of about ITEM_BYTES of pixels, never past an epoch."""
        per_batch = 4 * self.batch_size * int(np.prod(self.manifest.image_shape))
        return max(1, min(self.batches_per_epoch, ITEM_BYTES // per_batch))

    def _start(self) -> None:
        parts = rank_parts(self.global_batch, self.num_streams, self.rank, self.batch_size)
        parts_by_worker = split_among_workers(parts, self.num_workers)
        workers = len(parts_by_worker) if self.num_workers > 0 else 0
        if workers < self.num_workers:
            log.info("data loader: %d worker(s), not %d: this rank's rows come from %d of the %d data.streams",
                     workers, self.num_workers, len(parts), self.num_streams)
        if workers == 0:
            parts_by_worker = [parts]
        self._item_sources = max(1, workers)
        ds = _PairDataset(self.manifest, self.data_cfg, parts_by_worker, self.num_streams, self.seed,
                          self.batches_per_epoch, self._chunk(), self._k, self.with_ids)
        kwargs: dict[str, Any] = {}
        self._released = None
        if workers > 0:
            context = multiprocessing.get_context(_worker_context())
            self._released = context.Array("q", workers, lock=False)
            kwargs.update(prefetch_factor=self.data_cfg.prefetch_factor, persistent_workers=True,
                          multiprocessing_context=context)
        # slots: the DataLoader keeps at most prefetch_factor items of a worker in flight, plus one being copied
        slots = self.data_cfg.prefetch_factor + 2
        self._loader = DataLoader(_PairIterable(ds, self._released, slots), batch_size=None, num_workers=workers,
                                  **kwargs)  # pinned by _copy_out, in the copy it makes anyway
        with stop_signals_held():  # the workers start here and leave preemption to the trainer
            self._iter = iter(self._loader)
        if workers > 0:
            _loaders_with_workers.add(self)

    def close(self) -> None:
        """Stop the worker processes (iteration restarts them where it left off)."""
        it, self._iter, self._loader = self._iter, None, None
        self._pending.clear()
        self._slot_tensors.clear()
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
        if not self._pending:
            t0 = time.perf_counter()
            self._receive()
            self.wait_seconds += time.perf_counter() - t0
        self._k += 1
        return self._pending.popleft()

    def _receive(self) -> None:
        """The next chunk of batches: one item from each worker (in worker order, as the DataLoader
        yields them), their rows side by side."""
        if self._iter is None:
            self._start()
        try:
            items = [next(self._iter) for _ in range(self._item_sources)]  # type: ignore[arg-type]
        except ShardError as exc:
            raise _as_raised_in_worker(exc) from None
        k, count = int(items[0]["_k"]), int(items[0]["_count"])
        if k != self._k or any(int(i["_k"]) != k or int(i["_count"]) != count for i in items):
            # cannot happen with the in-order DataLoader; guards the resume arithmetic
            raise RuntimeError(f"data loader produced batches {[int(i['_k']) for i in items]} where {self._k} "
                               "was expected")
        packed = items[0] if self._released is None and not self._pin else self._copy_out(items)
        for item in items:
            worker = int(item["_worker"])
            if self._released is not None:
                self._released[worker] += 1
                # holding the slot's tensors keeps their mapping in torch's cache: the next item in this slot
                # arrives without a new mmap and its page faults
                self._slot_tensors[(worker, int(item["_slot"]))] = item
            self._note_skips(worker, int(item["_skipped"]), item["_first_error"])
        self._pending.extend(unpack(packed))

    def _copy_out(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The items' rows side by side in new tensors, pinned on a CUDA machine: out of the workers' slots,
        which they reuse, in one copy. numpy copies: a torch op here would wake the consumer's OpenMP
        threads, which spin on the cores the workers need."""
        packed = {}
        for name in (n for n in items[0] if not n.startswith("_")):
            parts = [item[name].numpy() for item in items]
            shape = (*parts[0].shape[:2], sum(p.shape[2] for p in parts), *parts[0].shape[3:])
            out = torch.empty(shape, dtype=items[0][name].dtype, pin_memory=self._pin)
            np.concatenate(parts, axis=2, out=out.numpy())
            packed[name] = out
        return packed

    def _note_skips(self, worker: int, skipped: int, first_error: str) -> None:
        self._skipped_by_worker[worker] = max(skipped, self._skipped_by_worker.get(worker, 0))
        if skipped and not self._warned:
            self._warned = True
            warnings.warn(f"data.on_error=skip: skipped a bad shard: {first_error}. Further skipped shards are "
                          "only counted (PairLoader.skipped_shards).", RuntimeWarning, stacklevel=4)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def resolve_num_streams(setting: int | str, global_batch: int, world_size: int, num_workers: int,
                        num_shards: int) -> int:
    """``data.streams``: ``auto`` gives one stream per (rank, worker) of this run's first start, at most
    one per shard (a stream with no shard of its own would re-read another's) and one per row of the
    global batch. A resumed run keeps the number it started with (PairLoader.load_state_dict)."""
    if setting == "auto":
        return max(1, min(world_size * max(1, num_workers), num_shards, global_batch))
    streams = int(setting)
    if not 1 <= streams <= global_batch:
        raise ConfigError(f"config key 'data.streams' must be auto or 1..{global_batch} (the pairs per loader step "
                          f"over all ranks), got {setting}")
    return streams


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
    for _, groups in _read_shards(data_cfg, manifest, range(len(manifest.shards))):
        yield from groups


def _read_shards(data_cfg: DataConfig, manifest: Manifest, indices) -> Iterator[tuple[int, list[Group]]]:
    """(index, groups) of these shards in order, under data.on_error; a skipped shard is left out and the
    first one warned about."""
    source = _ShardSource(manifest, data_cfg.on_error, data_cfg.verify_checksums)
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
    for index, groups in _read_shards(data_cfg, manifest, wanted):
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
