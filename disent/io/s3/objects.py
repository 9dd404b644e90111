"""Whole-object operations: read, download, upload (multipart through boto3's transfer), list, check,
delete, create a bucket."""
from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore import exceptions as bex

from disent.io.s3.connection import S3Error, S3NotFound, call, status_and_code, client, parse_s3_url
from disent.io.s3.streams import open_read, upload_fileobj


log = logging.getLogger("disent.io.s3")


# --------------------------------------------------------------------------- helpers others reuse


def read_bytes(url: str) -> bytes:
    with open_read(url) as f:
        return f.read()


def download(url: str, local: str | os.PathLike | None = None) -> bytes | Path:
    """Return the object's bytes, or write them to ``local`` (atomically) and return that path."""
    if local is None:
        return read_bytes(url)
    path = Path(local)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open_read(url) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.replace(tmp, path)
    return path


def upload_bytes(data: bytes, url: str) -> None:
    upload_fileobj(io.BytesIO(bytes(data)), url)


def upload_file(local: str | os.PathLike, url: str) -> None:
    with open(local, "rb") as f:
        upload_fileobj(f, url)


@dataclass
class ObjectInfo:
    url: str
    key: str
    size: int


def list_prefix(url: str) -> list[ObjectInfo]:
    """Every object whose key starts with the URL's key (not only one 'directory' level)."""
    bucket, prefix = parse_s3_url(url)
    out: list[ObjectInfo] = []
    token = None
    while True:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        if token:
            kwargs["ContinuationToken"] = token
        page = call(lambda: client().list_objects_v2(**kwargs), url, "list")
        for item in page.get("Contents", []):
            out.append(ObjectInfo(url=f"s3://{bucket}/{item['Key']}", key=item["Key"], size=int(item["Size"])))
        if not page.get("IsTruncated"):
            return out
        token = page.get("NextContinuationToken")


def exists(url: str) -> bool:
    bucket, key = parse_s3_url(url)
    try:
        call(lambda: client().head_object(Bucket=bucket, Key=key), url, "inspect")
        return True
    except S3NotFound:
        return False
    except S3Error as exc:
        # Some servers answer HEAD of a missing key with a bare 404 that maps to a generic error.
        if "HTTP 404" in str(exc):
            return False
        raise


def delete(url: str) -> None:
    bucket, key = parse_s3_url(url)
    call(lambda: client().delete_object(Bucket=bucket, Key=key), url, "delete")


def create_bucket(name: str) -> None:
    """Create a bucket (used by tests and demos); an existing bucket owned by us is fine."""
    try:
        call(lambda: client().create_bucket(Bucket=name), f"s3://{name}", "create the bucket")
    except S3Error as exc:
        cause = exc.__cause__
        if isinstance(cause, bex.ClientError) and status_and_code(cause)[1] in (
            "BucketAlreadyOwnedByYou", "BucketAlreadyExists"
        ):
            return
        raise
