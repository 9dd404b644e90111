"""Reading one shard through WebDataset into checked groups, all or nothing.

A shard is used whole or not at all: its bytes are read completely (``webdataset.gopen``, which
opens ``s3://`` through :mod:`disent.io.s3`), their size (and, with ``verify_checksums``, their
sha256) checked against the manifest, its tar members indexed in place (Python's tarfile over the
bytes in memory, grouped into records by WebDataset's key rule) and decoded as views of those
bytes with ``np.frombuffer``, no copy; its groups are released only when the record and sample
counts match the manifest too. Anything else raises :class:`ShardError` naming the shard.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass

import numpy as np
import webdataset as wds
from webdataset.tariterators import base_plus_ext

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


def _read_whole(raw, size_hint: int) -> bytes:
    """Every byte of an opened shard, in large reads (one or a few for a local file or an S3 object)."""
    chunks, chunk = [], max(1 << 20, size_hint + 1)
    while True:
        data = raw.read(chunk)
        if not data:
            return b"".join(chunks) if len(chunks) != 1 else chunks[0]
        chunks.append(data)


def _records(data: bytes, url: str) -> list[dict]:
    """The shard's records, WebDataset's way (members grouped by the key before the first dot of the
    file name), each entry a zero-copy view into `data`."""
    view = memoryview(data)
    records: list[dict] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        for member in archive:
            if not member.isreg():
                continue
            key, suffix = base_plus_ext(member.name)
            if key is None:
                continue
            if not records or records[-1]["__key__"] != key:
                records.append({"__key__": key, "__url__": url})
            if member.offset_data + member.size > len(data):
                raise tarfile.ReadError(f"member {member.name} ends past the end of the file")
            records[-1][suffix] = view[member.offset_data:member.offset_data + member.size]
    return records


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
        label = int(bytes(sample["cls"]))
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
    url = info.url
    try:
        raw = wds.gopen(url, "rb")
    except FileNotFoundError as exc:
        raise ShardError(f"shard {url} is missing ({exc}); the data at {manifest.url} is incomplete: "
                         "re-run `disent prepare`", url) from None
    except OSError as exc:
        raise ShardError(f"shard {url} cannot be opened: {exc}", url) from None
    try:
        data = _read_whole(raw, info.bytes)
    except Exception as exc:  # noqa: BLE001 - local and S3 read errors both mean "this shard is bad"
        raise ShardError(f"shard {url} is unreadable ({type(exc).__name__}: {_reason(exc)})", url) from None
    finally:
        raw.close()
    if len(data) != info.bytes:
        raise ShardError(f"shard {url} is unreadable or truncated: {len(data)} bytes where its manifest says "
                         f"{info.bytes} (truncated or replaced; restore it or re-run `disent prepare`)", url)
    if verify_checksum:
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.sha256:
            raise ShardError(f"shard {url} fails its checksum: sha256 {digest}, manifest says {info.sha256}", url)
    try:
        groups = [_decode(record, manifest, url) for record in _records(data, url)]
    except ShardError:
        raise
    except Exception as exc:  # noqa: BLE001 - tarfile and decode errors both mean "this shard is bad"
        raise ShardError(f"shard {url} is unreadable or truncated ({type(exc).__name__}: {_reason(exc)})", url) from None
    samples = sum(len(g.ids) for g in groups)
    if len(groups) != info.groups or samples != info.samples:
        raise ShardError(
            f"shard {url} does not match its manifest: {len(groups)} groups, {samples} samples; expected "
            f"{info.groups} groups, {info.samples} samples (truncated or replaced)", url)
    return groups


def _reason(exc: BaseException) -> str:
    return str(exc.args[0]) if getattr(exc, "args", None) else type(exc).__name__
