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
import time
import warnings
import weakref
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from disent.config import ConfigError, DataConfig
from disent.data.errors import DataError, ShardError, unwrap_worker_error, wrong_local_content
from disent.data.manifest import Manifest
from disent.data.pairing import rank_parts, split_among_workers, unpack
from disent.data.reading import open_split
from disent.data.workers import PairDataset, WorkerItems, resolve_num_streams, resolve_num_workers, worker_context
from disent.signals import stop_signals_held

log = logging.getLogger(__name__)


ITEM_BYTES = 4 << 20  # pixels per item a worker hands over: fewer, larger transfers amortise the IPC


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
        manifest: the split's manifest, already read and checked (training passes its run plan's); read here without.

    Iterating continues from the current position; ``state_dict()``/``load_state_dict()``
    save and restore it (see the module docstring for the exact guarantee).
    """

    def __init__(self, data_cfg: DataConfig, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, with_ids: bool = False, manifest: Manifest | None = None):
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside 0..{world_size - 1}")
        self.data_cfg = data_cfg
        self.split = split
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.seed = seed
        self.with_ids = with_ids
        self.num_workers = resolve_num_workers(data_cfg.num_workers)
        self.manifest = manifest if manifest is not None else open_split(data_cfg, split)
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
        ds = PairDataset(self.manifest, self.data_cfg, parts_by_worker, self.num_streams, self.seed,
                          self.batches_per_epoch, self._chunk(), self._k, self.with_ids)
        kwargs: dict[str, Any] = {}
        self._released = None
        if workers > 0:
            context = multiprocessing.get_context(worker_context())
            self._released = context.Array("q", workers, lock=False)
            kwargs.update(prefetch_factor=self.data_cfg.prefetch_factor, persistent_workers=True,
                          multiprocessing_context=context)
        # slots: the DataLoader keeps at most prefetch_factor items of a worker in flight, plus one being copied
        slots = self.data_cfg.prefetch_factor + 2
        self._loader = DataLoader(WorkerItems(ds, self._released, slots), batch_size=None, num_workers=workers,
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
            exc = unwrap_worker_error(exc)
            if wrong_local_content(exc):
                raise DataError(f"{exc}; a local shard is read the same way on every restart, so this is not "
                                "retried") from None
            raise exc from None
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
