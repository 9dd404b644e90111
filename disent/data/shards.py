"""Reading one shard through WebDataset into checked groups, all or nothing.

A shard is used whole or not at all: it is parsed completely (WebDataset's tar expander and
key grouping over a stream from ``webdataset.gopen``, which opens ``s3://`` through
:mod:`disent.io.s3`) and its groups are released only when the record count, sample count and
byte size match the manifest, and, with ``verify_checksums``, the sha256 computed on the same
pass. Anything else raises :class:`ShardError` naming the shard.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np

from disent.io import s3  # noqa: F401  (registers the s3:// scheme in webdataset)
from disent.data.errors import ShardError
from disent.data.manifest import Manifest, ShardInfo


@dataclass
class Group:
    label: int
    images: np.ndarray  # uint8 [k, C, H, W]
    ids: np.ndarray  # int64 [k]
    factors: np.ndarray  # float32 [k, F]
    key: str = ""
    shard: str = ""


class _HashingReader(io.RawIOBase):
    """Counts (and optionally hashes) every byte that passes through."""

    def __init__(self, raw, hashing: bool):
        super().__init__()
        self.raw = raw
        self.hash = hashlib.sha256() if hashing else None
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self.raw.read(len(view))
        n = len(data)
        view[:n] = data
        self.count += n
        if self.hash is not None and n:
            self.hash.update(data)
        return n

    def drain(self) -> None:
        while self.readinto(bytearray(1 << 16)):
            pass

    def close(self) -> None:
        try:
            self.raw.close()
        finally:
            super().close()


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}


def _load_npy(data: bytes) -> np.ndarray:
    """Decode .npy bytes without copying the payload. Headers (few distinct ones per data set)
    are parsed once by numpy and cached; numpy's own parser costs ~100 us per array."""
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        raise ValueError("not a .npy payload")
    major = data[6]
    if major == 1:
        hlen, start = int.from_bytes(data[8:10], "little"), 10
    else:
        hlen, start = int.from_bytes(data[8:12], "little"), 12
    header = bytes(data[start:start + hlen])
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        arr = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
        if arr.dtype.hasobject or not arr.flags.c_contiguous:
            return arr
        parsed = (arr.dtype, arr.shape, start + hlen)
        if len(_NPY_HEADERS) < 4096:
            _NPY_HEADERS[header] = parsed
        return arr
    dtype, shape, offset = parsed
    count = int(np.prod(shape))
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"npy payload of {len(data) - offset} bytes for shape {shape} {dtype}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def _decode(sample: dict, manifest: Manifest, url: str) -> Group:
    key = sample.get("__key__", "?")
    try:
        label = int(sample["cls"])
        images = _load_npy(sample["images.npy"])
        ids = _load_npy(sample["ids.npy"])
        nf = len(manifest.factor_names)
        factors = _load_npy(sample["factors.npy"]) if nf else np.zeros((len(ids), 0), np.float32)
    except KeyError as exc:
        raise ShardError(f"shard {url}: record {key} lacks its {exc.args[0]} entry (corrupt shard)", url) from None
    except (ValueError, OSError, EOFError) as exc:
        raise ShardError(f"shard {url}: record {key} cannot be decoded ({exc}) (corrupt shard)", url) from None
    k = len(ids)
    if images.dtype != np.uint8 or images.shape != (k, *manifest.image_shape):
        raise ShardError(f"shard {url}: record {key} holds images {images.dtype} {images.shape}, expected uint8 "
                         f"{(k, *manifest.image_shape)} (corrupt shard or wrong manifest)", url)
    if factors.shape != (k, len(manifest.factor_names)):
        raise ShardError(f"shard {url}: record {key} holds factors {factors.shape}, expected "
                         f"{(k, len(manifest.factor_names))}", url)
    if not 0 <= label < manifest.num_classes:
        raise ShardError(f"shard {url}: record {key} has class {label}, outside 0..{manifest.num_classes - 1}", url)
    return Group(label, images, ids.astype(np.int64, copy=False), factors.astype(np.float32, copy=False), key, url)


def read_shard(info: ShardInfo, manifest: Manifest, verify_checksum: bool = False) -> list[Group]:
    """All groups of one shard, checked against the manifest; ShardError names the shard otherwise."""
    import webdataset as wds
    from webdataset import tariterators

    url = info.url
    try:
        raw = wds.gopen(url, "rb")
    except FileNotFoundError as exc:
        raise ShardError(f"shard {url} is missing ({exc}); the data at {manifest.url} is incomplete: "
                         "re-run `disent prepare`", url) from None
    except OSError as exc:
        raise ShardError(f"shard {url} cannot be opened: {exc}", url) from None
    reader = _HashingReader(raw, verify_checksum)
    stream = io.BufferedReader(reader, buffer_size=1 << 20)
    groups: list[Group] = []
    try:
        files = tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=wds.reraise_exception)
        for sample in tariterators.group_by_keys(files, handler=wds.reraise_exception):
            groups.append(_decode(sample, manifest, url))
        reader.drain()
    except ShardError:
        raise
    except Exception as exc:  # noqa: BLE001 - tarfile, S3 and decode errors all mean "this shard is bad"
        reason = str(exc.args[0]) if getattr(exc, "args", None) else type(exc).__name__
        raise ShardError(f"shard {url} is unreadable or truncated ({type(exc).__name__}: {reason})", url) from None
    finally:
        stream.close()
    samples = sum(len(g.ids) for g in groups)
    if reader.count != info.bytes or len(groups) != info.groups or samples != info.samples:
        raise ShardError(
            f"shard {url} does not match its manifest: {reader.count} bytes, {len(groups)} groups, {samples} "
            f"samples; expected {info.bytes} bytes, {info.groups} groups, {info.samples} samples "
            "(truncated or replaced)", url)
    if verify_checksum:
        digest = reader.hash.hexdigest()  # type: ignore[union-attr]
        if digest != info.sha256:
            raise ShardError(f"shard {url} fails its checksum: sha256 {digest}, manifest says {info.sha256}", url)
    return groups
