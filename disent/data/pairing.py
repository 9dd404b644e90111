"""The order of an epoch's pairs, defined once for all ranks and workers.

An epoch is made by ``V`` canonical *streams* (``data.streams``; fixed for a run and saved in the
loader's state). Stream ``v``:

* reads shards ``order[v], order[v+V], order[v+2V], ...`` cyclically, where ``order`` is a
  permutation of the split's shards seeded by (seed, epoch);
* keeps its own pool of samples (:class:`_Store`, per-class shuffled queues) and draws pairs from
  it with its own random streams seeded by (seed, epoch, v), in draws of a fixed size;
* fills rows ``[v*M//V, (v+1)*M//V)`` of every *global* batch, where ``M`` is the number of pairs
  one loader step yields over all ranks (the micro batch times the world size, which the trainer
  keeps constant across world sizes): global batch ``b`` of the epoch holds the stream's pairs
  ``b*R_v .. (b+1)*R_v - 1`` (``R_v`` = its rows).

So global batch ``b`` of epoch ``e`` is a function of the data, the seed, ``e``, ``b``, ``M`` and
``V`` only. Rank ``r`` of ``W`` takes its rows ``[r*M/W, (r+1)*M/W)`` of it: whole streams when
``V`` is a multiple of ``W``; otherwise a stream on the boundary is drawn by both ranks, each
keeping its rows. Workers of a rank split the rank's streams between them. How many ranks and
workers there are changes who computes a row, never what is in it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from disent.data.errors import DataError
from disent.data.manifest import Manifest
from disent.data.shards import Group

MAX_DRAW = 256  # pairs per draw: large enough to amortise the per-draw numpy calls


class ShardReader(Protocol):
    def read(self, index: int) -> list[Group] | None: ...


def _seed_int(*words: int) -> int:
    return int(np.random.SeedSequence([int(w) & 0xFFFFFFFF for w in words]).generate_state(2, np.uint64)[0])


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The shard order of an epoch, the same on every rank and worker."""
    return np.random.default_rng(_seed_int(seed, epoch, 0x5A4D)).permutation(num_shards)


# --------------------------------------------------------------------------- who computes which rows


@dataclass(frozen=True)
class StreamPart:
    """A stream's share of one rank's batch: the stream fills `rows` rows of the global batch, of which
    `keep` (a range within those rows) belong to the rank."""
    stream: int
    rows: int
    keep_from: int
    keep_to: int


def stream_rows(global_batch: int, num_streams: int) -> list[tuple[int, int]]:
    """[lo, hi) rows of the global batch that each stream fills."""
    return [(v * global_batch // num_streams, (v + 1) * global_batch // num_streams) for v in range(num_streams)]


def rank_parts(global_batch: int, num_streams: int, rank: int, batch_size: int) -> list[StreamPart]:
    """The streams whose rows fall in rank's rows [rank*batch_size, (rank+1)*batch_size), in row order."""
    first, last = rank * batch_size, (rank + 1) * batch_size
    parts = []
    for v, (lo, hi) in enumerate(stream_rows(global_batch, num_streams)):
        if lo < last and hi > first:
            parts.append(StreamPart(v, hi - lo, max(lo, first) - lo, min(hi, last) - lo))
    return parts


def split_among_workers(parts: list[StreamPart], workers: int) -> list[list[StreamPart]]:
    """Contiguous runs of parts, as even in number as possible; never an empty run (so fewer runs than
    workers when a rank has fewer streams than workers)."""
    runs = min(max(1, workers), len(parts))
    bounds = [i * len(parts) // runs for i in range(runs + 1)]
    return [parts[bounds[i]:bounds[i + 1]] for i in range(runs)]


def draw_sizes(num_samples: int, num_streams: int, shuffle_buffer: int) -> tuple[int, int]:
    """(pairs per draw, samples a stream's pool is refilled to before a draw). Both depend on the data,
    the number of streams and data.shuffle_buffer only, so a stream draws the same on any world size."""
    share = max(2, num_samples // (2 * num_streams))  # about half a stream's samples per epoch
    draw = max(1, min(MAX_DRAW, shuffle_buffer // 8, share // 4))
    return draw, max(4 * draw, min(shuffle_buffer, share))


# --------------------------------------------------------------------------- one stream


class PairStream:
    """One stream's pairs in one epoch, an infinite deterministic sequence drawn `n` at a time.

    The samples read and not yet drawn as x1/x1' sit in one contiguous store (:class:`_Store`), and
    each class keeps a shuffled queue of its samples' places there: drawing a same-class pair without
    replacement is taking the next two of its queue. A draw is a few numpy calls (classes in
    proportion to their pool sizes), so the cost per pair is not per-sample Python.
    """

    def __init__(self, manifest: Manifest, source: ShardReader, pool_target: int, seed: int, epoch: int,
                 stream: int, num_streams: int, with_ids: bool, store: _Store | None = None):
        self.manifest = manifest
        self.source = source
        self.with_ids = with_ids
        self.order = epoch_shard_order(len(manifest.shards), seed, epoch)
        self.stream, self.num_streams = stream, num_streams
        self.next_in_sequence = 0
        self.rng1 = np.random.default_rng(_seed_int(seed, epoch, stream, 1))  # (x1, x1') draws
        self.rng2 = np.random.default_rng(_seed_int(seed, epoch, stream, 2))  # (x2, x2') draws: independent
        self.target = pool_target
        self.queues = [np.empty(0, np.int64) for _ in range(manifest.num_classes)]  # store places, shuffled
        # the previous epoch's store (emptied) saves growing the arrays again; rows carry no meaning
        self.store = store.emptied() if store is not None else _Store(manifest.image_shape, len(manifest.factor_names))
        self.stalled = 0  # shards read in a row that added no sample
        self.read_this_epoch: set[int] = set()

    def sizes(self) -> np.ndarray:
        return np.array([len(q) for q in self.queues], np.int64)

    def _next_shard(self) -> None:
        n = len(self.order)
        while True:
            index = int(self.order[(self.stream + self.next_in_sequence * self.num_streams) % n])
            self.next_in_sequence += 1
            groups = self.source.read(index)
            if groups:
                break
        places = self.store.add(groups)
        labels = self.store.labels[places]
        read_before = index in self.read_this_epoch
        self.read_this_epoch.add(index)
        for c in np.unique(labels):
            new = places[labels == c]
            if read_before:  # a shard read twice in one epoch (tiny splits) must not put a sample in the pool twice
                new = new[~np.isin(self.store.ids[new], self.store.ids[self.queues[c]])]
            self.queues[c] = self.rng1.permutation(np.concatenate([self.queues[c], new]))

    def _read_more(self, n: int) -> None:
        """Read the next shard; a whole cycle of shards that adds nothing means the split cannot serve."""
        before = int(self.sizes().sum())
        self._next_shard()
        self.stalled = 0 if self.sizes().sum() > before else self.stalled + 1
        if self.stalled > len(self.order):
            raise DataError(
                f"{self.manifest.url}: the samples one loader stream reads ({before}) cannot fill draws of "
                f"{n} same-class pairs; use a smaller batch, fewer data.streams, or more data"
            )

    def _classes(self, rng: np.random.Generator, n: int, need_two_each: bool) -> np.ndarray:
        """n class draws in proportion to pool size; with need_two_each, every class drawn k times
        holds 2k samples (redrawn a few times, then more is read)."""
        while True:
            sizes = self.sizes().astype(np.float64)
            sizes[sizes < 2] = 0
            for _ in range(8 if sizes.sum() > 0 else 0):
                picks = rng.choice(len(sizes), size=n, p=sizes / sizes.sum())
                if not need_two_each or np.all(2 * np.bincount(picks, minlength=len(sizes)) <= sizes):
                    return picks
            self._read_more(n)

    def refs(self, n: int) -> np.ndarray:
        """The next n pairs as places in the store (no pixels copied): [4, n] for x1, x1', x2, x2'."""
        while self.sizes().sum() < self.target and self.stalled <= len(self.order) // 2:
            self._read_more(n)
        picks1 = self._classes(self.rng1, n, need_two_each=True)
        picks2 = self._classes(self.rng2, n, need_two_each=False)  # every read happens before any draw
        out = np.empty((4, n), np.int64)
        # x2, x2': two distinct samples of the class, left in the pool
        sizes = self.sizes()
        flat, starts = np.concatenate(self.queues), np.cumsum(sizes) - sizes
        count = sizes[picks2]
        a = (self.rng2.random(n) * count).astype(np.int64)
        b = (self.rng2.random(n) * (count - 1)).astype(np.int64)
        b += b >= a
        out[2], out[3] = flat[starts[picks2] + a], flat[starts[picks2] + b]
        # x1, x1': the next two of the class's shuffled queue, taken out of the pool
        counts = np.bincount(picks1, minlength=len(self.queues))
        taken = []
        for c in np.flatnonzero(counts):
            taken.append(self.queues[c][: 2 * counts[c]])
            self.queues[c] = self.queues[c][2 * counts[c]:]
        rows = np.argsort(picks1, kind="stable")  # the draw's rows of class 0's pairs, then class 1's, ...
        pairs = np.concatenate(taken).reshape(-1, 2)
        out[0, rows], out[1, rows] = pairs[:, 0], pairs[:, 1]
        self.store.release(pairs.ravel())  # rewritten only by a later draw's reads, after this one is gathered
        return out

    def empty(self, n: int) -> dict[str, np.ndarray]:
        """Arrays for n pairs: x [4, n, C, H, W], f [4, n, F], y [2, n] (classes of x1 and x2), id [4, n]."""
        store = self.store
        out = {"x": np.empty((4, n, *store.image_shape), np.uint8), "f": np.empty((4, n, store.num_factors), np.float32),
               "y": np.empty((2, n), np.int64)}
        if self.with_ids:
            out["id"] = np.empty((4, n), np.int64)
        return out

    def gather(self, refs: np.ndarray, out: dict[str, np.ndarray], at: int) -> None:
        """Copy the pairs at `refs` ([4, k] store places) into out's pairs at..at+k: one copy, no temporary."""
        store, k = self.store, refs.shape[1]
        for col in range(4):
            rows = refs[col]
            np.take(store.images, rows, axis=0, out=out["x"][col, at:at + k], mode="clip")
            np.take(store.factors, rows, axis=0, out=out["f"][col, at:at + k], mode="clip")
            if "id" in out:
                np.take(store.ids, rows, out=out["id"][col, at:at + k], mode="clip")
        out["y"][0, at:at + k] = store.labels[refs[0]]
        out["y"][1, at:at + k] = store.labels[refs[2]]


class StreamCursor:
    """A position in one stream's epoch of `total` pairs. Draws follow a fixed schedule (`draw` pairs,
    the last one what is left), whatever slices the consumer takes, so the pairs at a position do not
    depend on how they are taken; skipping draws without copying pixels."""

    def __init__(self, stream: PairStream, draw: int, total: int):
        self.stream, self.draw, self.total = stream, draw, total
        self.position = 0
        self._drawn = 0  # pairs drawn so far; the current draw covers [_start, _drawn)
        self._start = 0
        self._refs: np.ndarray | None = None  # the current draw's store places (valid until the next draw)

    def _cover(self) -> None:
        """Draw until the current draw holds `position`."""
        while self._drawn <= self.position:
            n = min(self.draw, self.total - self._drawn)
            if n <= 0:
                raise IndexError(f"stream position {self.position} is past the epoch's {self.total} pairs")
            self._refs = self.stream.refs(n)
            self._start, self._drawn = self._drawn, self._drawn + n

    def skip(self, n: int) -> None:
        self.position += n

    def take(self, n: int, out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The next n pairs ([4, n, ...] arrays, [2, n] for y; into `out` if given), each gathered from the
        store once (before the next draw, which may move the store's rows)."""
        out = self.stream.empty(n) if out is None else out
        filled = 0
        while filled < n:
            self._cover()
            lo = self.position - self._start
            hi = min(self._drawn - self._start, lo + n - filled)
            self.stream.gather(self._refs[:, lo:hi], out, filled)  # type: ignore[index]
            self.position += hi - lo
            filled += hi - lo
        return out


class _Store:
    """The samples of a stream's pool in preallocated arrays (one fancy index gathers a draw). The row of a
    sample drawn as x1/x1' is freed, and the next shard's samples are written into free rows, so rows never
    move: no compaction, and the arrays grow only while the pool first fills."""

    FIELDS = ("images", "factors", "ids", "labels")

    def __init__(self, image_shape: tuple[int, ...], num_factors: int):
        self.image_shape, self.num_factors = tuple(image_shape), num_factors
        self.free = np.empty(0, np.int64)
        self._allocate(0)

    def _allocate(self, capacity: int) -> None:
        self.images = np.empty((capacity, *self.image_shape), np.uint8)
        self.factors = np.empty((capacity, self.num_factors), np.float32)
        self.ids = np.empty(capacity, np.int64)
        self.labels = np.empty(capacity, np.int64)

    def _grow(self, capacity: int) -> None:
        """Larger arrays; every row keeps its place, the new rows are free."""
        old = len(self.ids)
        kept = [getattr(self, field) for field in self.FIELDS]
        self._allocate(capacity)
        for field, values in zip(self.FIELDS, kept):
            getattr(self, field)[:old] = values
        self.free = np.concatenate([self.free, np.arange(old, capacity, dtype=np.int64)])

    def add(self, groups: list[Group]) -> np.ndarray:
        """Write the groups' samples into free rows; returns their rows."""
        count = sum(len(g.ids) for g in groups)
        if len(self.free) < count:
            self._grow(max(2 * len(self.ids), len(self.ids) + count - len(self.free)))
        rows, self.free = self.free[:count], self.free[count:]
        at = 0
        for g in groups:
            k = len(g.ids)
            where = rows[at:at + k]
            self.images[where], self.factors[where], self.ids[where], self.labels[where] = (
                g.images, g.factors, g.ids, g.label)
            at += k
        return rows

    def emptied(self) -> _Store:
        self.free = np.arange(len(self.ids), dtype=np.int64)
        return self

    def release(self, rows: np.ndarray) -> None:
        self.free = np.concatenate([self.free, rows])


def take_rows(cursors: list[StreamCursor], parts: list[StreamPart], batches: int,
              out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The next `batches` batches' rows of these parts: arrays [4, batches, rows, ...] ([2, ...] for y), the
    parts' kept rows side by side in row order; written into `out` (contiguous arrays of those shapes)
    when given."""
    if len(parts) == 1 and parts[0].keep_from == 0 and parts[0].keep_to == parts[0].rows:
        # one whole stream: its pairs, batch after batch, are the item; gathered straight into place
        n = batches * parts[0].rows
        flat = None if out is None else {k: v.reshape(v.shape[0], n, *v.shape[3:]) for k, v in out.items()}
        arrays = cursors[0].take(n, flat)
        return {k: v.reshape(v.shape[0], batches, parts[0].rows, *v.shape[2:]) for k, v in arrays.items()}
    pieces = []
    for cursor, part in zip(cursors, parts):
        arrays = cursor.take(batches * part.rows)
        pieces.append({k: v.reshape(v.shape[0], batches, part.rows, *v.shape[2:])[:, :, part.keep_from:part.keep_to]
                       for k, v in arrays.items()})
    if out is None:
        return {k: np.concatenate([p[k] for p in pieces], axis=2) for k in pieces[0]}
    for k in pieces[0]:
        np.concatenate([p[k] for p in pieces], axis=2, out=out[k])
    return out


def item_shapes(image_shape: tuple[int, ...], num_factors: int, batches: int, rows: int, with_ids: bool
                ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each array take_rows returns."""
    shapes = {"x": ((4, batches, rows, *image_shape), np.dtype(np.uint8)),
              "f": ((4, batches, rows, num_factors), np.dtype(np.float32)),
              "y": ((2, batches, rows), np.dtype(np.int64))}
    if with_ids:
        shapes["id"] = ((4, batches, rows), np.dtype(np.int64))
    return shapes


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
