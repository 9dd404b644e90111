"""Reading and writing one object as a stream: reads that break part-way resume with a ranged GET; the
``s3://`` scheme for WebDataset's gopen."""
from __future__ import annotations

import importlib
import io
import logging
import random
import tempfile
import time
from typing import Any

from disent.io.s3.connection import S3Error, call, describe, final_error, retry_settings, client, is_retryable, parse_s3_url


log = logging.getLogger("disent.io.s3")


# --------------------------------------------------------------------------- reading


class S3Reader(io.RawIOBase):
    """A streaming, read-only view of one object.

    Bytes come straight from the GetObject body (nothing is buffered beyond what the caller
    reads). If the connection fails part-way, the read is retried with ``Range: bytes=N-``
    from the first byte not yet delivered, so callers never see a gap or a repeat.
    """

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self.bucket, self.key = parse_s3_url(url)
        self.pos = 0
        self.size: int | None = None
        self.etag: str | None = None
        self._body = None
        self._open()

    def _open(self) -> None:
        def get():
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
            if self.pos:
                kwargs["Range"] = f"bytes={self.pos}-"
                if self.etag:
                    kwargs["IfMatch"] = self.etag  # never splice two versions of an object
            return client().get_object(**kwargs)

        response = call(get, self.url, "read")
        if self.size is None:
            self.size = int(response.get("ContentLength", 0))
            self.etag = response.get("ETag")
        self._body = response["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        if self.size is not None and self.pos >= self.size:
            return 0
        retries, backoff = retry_settings()
        attempt = 0
        while True:
            try:
                if self._body is None:
                    self._open()  # a ranged GET past byte 0; botocore retries the request itself
                data = self._body.read(len(view))
                if not data and self.size is not None and self.pos < self.size:
                    raise ConnectionError(f"stream ended at byte {self.pos} of {self.size}")
            except S3Error:
                raise
            except Exception as exc:  # noqa: BLE001
                if attempt >= retries or not is_retryable(exc):
                    raise final_error(exc, self.url, "read") from exc
                # The body broke mid-stream (botocore does not retry reads of a returned body):
                # resume from self.pos with the same bound as botocore's attempts.
                self._discard_body()
                attempt += 1
                delay = min(20.0, backoff * (2 ** (attempt - 1))) * (0.5 + random.random() / 2)
                log.warning("S3 read of %s broke at byte %d (%s); resuming, retry %d/%d in %.2fs", self.url,
                            self.pos, describe(exc), attempt, retries, delay)
                time.sleep(delay)
                continue
            n = len(data)
            view[:n] = data
            self.pos += n
            return n

    def _discard_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        self._discard_body()
        super().close()

    def __repr__(self) -> str:
        return f"<S3Reader {self.url}>"


class S3Writer(io.RawIOBase):
    """Collects bytes in a spooled temporary file and uploads them as one object on close."""

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        parse_s3_url(url)
        self._buffer = tempfile.SpooledTemporaryFile(max_size=64 << 20)

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self._buffer.write(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self._buffer.seek(0)
                upload_fileobj(self._buffer, self.url)
            finally:
                self._buffer.close()
        super().close()


def open_read(url: str, bufsize: int = 1 << 20) -> io.BufferedReader:
    return io.BufferedReader(S3Reader(url), buffer_size=bufsize)


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw) -> io.IOBase:
    """The ``s3://`` handler for ``webdataset.gopen``: a streaming reader or an upload-on-close writer."""
    if mode == "rb":
        return open_read(url, max(bufsize, 1 << 20))
    if mode == "wb":
        return io.BufferedWriter(S3Writer(url), buffer_size=max(bufsize, 1 << 20))
    raise ValueError(f"{url}: unsupported mode {mode!r}")


def register_gopen() -> None:
    # `webdataset.gopen` the attribute is the function; the dispatch table lives in the module.
    wds_gopen = importlib.import_module("webdataset.gopen")
    wds_gopen.gopen_schemes["s3"] = gopen_s3


def upload_fileobj(fileobj, url: str) -> None:
    bucket, key = parse_s3_url(url)
    start = fileobj.tell() if fileobj.seekable() else None
    # put_object for small bodies keeps one request per object (atomic replace, no multipart
    # state left behind); large bodies go through the managed multipart transfer.
    fileobj.seek(0, io.SEEK_END)
    size = fileobj.tell() - (start or 0)
    fileobj.seek(start or 0)

    def put():
        fileobj.seek(start or 0)
        if size <= 64 << 20:
            client().put_object(Bucket=bucket, Key=key, Body=fileobj.read())
        else:
            client().upload_fileobj(fileobj, bucket, key)

    call(put, url, "upload")
