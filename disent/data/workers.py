"""The worker side of the loader: what each DataLoader worker (or the consuming process, with none)
iterates, how its items go out through reused shared-memory slots, and how many workers and streams a
rank gets."""
from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from disent import host
from disent.config import DataConfig
from disent.data.manifest import Manifest
from disent.data.pairing import PairStream, StreamCursor, StreamPart, draw_sizes, item_shapes, take_rows

log = logging.getLogger(__name__)
from disent.data.reading import ShardSource


class PairDataset:
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

    def _cursors(self, parts: list[StreamPart], source: ShardSource, epoch: int, batch: int,
                 before: list[StreamCursor]) -> list[StreamCursor]:
        cursors = []
        for i, part in enumerate(parts):
            stream = PairStream(self.manifest, source, self.pool_target, self.seed, epoch, part.stream,
                                self.num_streams, self.with_ids, before[i].stream.store if before else None)
            cursor = StreamCursor(stream, self.draw, self.batches_per_epoch * part.rows)
            cursor.skip(batch * part.rows)  # a resume mid-epoch: drawn again, pixels not copied
            cursors.append(cursor)
        return cursors

    def items(self, worker: int, handoff: HandOff | None = None) -> Iterator[dict[str, Any]]:
        parts = self.parts_by_worker[worker]
        rows = sum(p.keep_to - p.keep_from for p in parts)
        source = ShardSource(self.manifest, self.cfg.on_error, self.cfg.verify_checksums)
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


class WorkerItems(IterableDataset):
    """The torch face of PairDataset (module level, so spawn/forkserver workers can pickle it)."""

    def __init__(self, inner: PairDataset, released=None, slots: int = 0):
        self.inner = inner
        self.released, self.slots = released, slots  # the workers' hand-off (None with no worker)

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        handoff = HandOff(self.released, worker, self.slots) if info is not None and self.released is not None else None
        if handoff is not None:
            # slots go out by shared-memory name: the consumer maps each once and finds it in torch's cache
            # after that (the default, by file descriptor, costs a socket round trip per tensor and item)
            torch.multiprocessing.set_sharing_strategy("file_system")
        for item in self.inner.items(worker, handoff):
            yield {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in item.items()}


class HandOff:
    """A worker's items go out in shared-memory slots that it reuses round robin. Torch sends a tensor that
    is already shared without copying it, so an item costs the worker no fresh shared memory (fresh
    shared memory is page-faulted and zeroed, which would be the larger part of a worker's time for large
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


def worker_context() -> str | None:
    """DataLoader workers are forked on Linux (fast start, no re-import), whatever the process's
    own default (spawned ranks default to spawn; Python 3.14 to forkserver). DISENT_DATA_MP_CONTEXT
    overrides it."""
    wanted = os.environ.get("DISENT_DATA_MP_CONTEXT")
    if wanted:
        return wanted
    if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
        return "fork"
    return None


def rank_cores() -> int:
    """A rank's cores: ``DISENT_CPUS_PER_RANK`` (the launcher's share, Slurm's --cpus-per-task), else the usable CPUs
    divided by ``LOCAL_WORLD_SIZE``. Thread limits such as OMP_NUM_THREADS do not count: they leave the other cores
    free for workers."""

    def positive(name: str) -> int | None:
        value = os.environ.get(name, "")
        return int(value) if value.isdigit() and int(value) > 0 else None

    return positive("DISENT_CPUS_PER_RANK") or max(1, host.available_cpus() // (positive("LOCAL_WORLD_SIZE") or 1))


def resolve_num_workers(setting: int | str) -> int:
    """``data.num_workers``; ``auto`` gives a rank one worker per core it has beyond its own (rank_cores), at most
    4, and none when the ranks fill the machine's cores: a worker that competes with a rank for a core delays that
    rank at every all-reduce by more than the decoding it takes over (docs/benchmarks.md). A number is taken as it
    is, with a warning when the workers and the rank would share its cores."""
    cores = rank_cores()
    if setting != "auto":
        if int(setting) > cores - 1:
            log.warning("data.num_workers=%s with %d core(s) for this rank: the workers compete with the rank for "
                        "its cores; at most %d leaves the rank one of its own (or data.num_workers=auto)",
                        setting, cores, max(0, cores - 1))
        return int(setting)
    return max(0, min(4, cores - 1))


def resolve_num_streams(setting: int | str, global_batch: int, world_size: int, num_workers: int,
                        num_shards: int) -> int:
    """``data.streams``: ``auto`` gives one stream per (rank, worker) of this run's first start, at most
    one per shard (a stream with no shard of its own would re-read another's) and one per row of the
    global batch. A resumed run keeps the number it started with (PairLoader.load_state_dict). A number is taken as
    it is: the config checks hold it to 1..global batch when the config is loaded."""
    if setting == "auto":
        return max(1, min(world_size * max(1, num_workers), num_shards, global_batch))
    return int(setting)
