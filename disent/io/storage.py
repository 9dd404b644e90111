"""One small API over local directories and ``s3://`` prefixes (what prepare and stream need)."""
from __future__ import annotations

import os
from pathlib import Path

from disent.io import s3


def join(base: str, *parts: str) -> str:
    if s3.is_s3_url(base):
        return s3.join_url(base, *parts)
    return str(Path(base, *parts))


def describe(url: str) -> str:
    """How a location reads in messages: s3 URLs as given, local paths absolute."""
    return url if s3.is_s3_url(url) else str(Path(url).absolute())


def read_bytes(url: str) -> bytes:
    """Raises FileNotFoundError (s3.S3NotFound for S3) when missing."""
    if s3.is_s3_url(url):
        return s3.read_bytes(url)
    return Path(url).read_bytes()


def open_read(url: str):
    if s3.is_s3_url(url):
        return s3.open_read(url)
    return open(url, "rb")


def exists(url: str) -> bool:
    if s3.is_s3_url(url):
        return s3.exists(url)
    return Path(url).exists()


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Readers see the old object or the new one, never a partial one.

    Local: written to a temporary name in the same directory, fsynced, then renamed.
    S3: one PutObject, which S3 applies atomically.
    """
    if s3.is_s3_url(url):
        s3.upload_bytes(data, url)
        return
    path = Path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def delete(url: str) -> None:
    if s3.is_s3_url(url):
        s3.delete(url)
    else:
        Path(url).unlink(missing_ok=True)


def list_names(prefix_url: str) -> list[str]:
    """Names of the objects/files directly inside a 'directory' (local dir or s3 prefix)."""
    if s3.is_s3_url(prefix_url):
        base = prefix_url.rstrip("/") + "/"
        _, key_prefix = s3.parse_s3_url(base)
        names = []
        for info in s3.list_prefix(base):
            rest = info.key[len(key_prefix):]
            if rest and "/" not in rest:
                names.append(rest)
        return sorted(names)
    path = Path(prefix_url)
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if p.is_file())
