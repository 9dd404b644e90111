"""S3 access for shards, manifests and checkpoints, and the ``s3://`` scheme for WebDataset.

Importing this module registers :func:`gopen_s3` in ``webdataset.gopen.gopen_schemes`` so that
``wds`` pipelines (and :func:`webdataset.gopen`) open ``s3://bucket/key`` URLs.

Clients come from boto3's standard credential chain (environment, ``AWS_PROFILE``, shared
config files, instance/container roles). ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``
selects an S3-compatible server (path-style addressing is then used). Every call is retried by
botocore's "standard" retry mode (throttling, 5xx responses and connection errors, capped
exponential backoff with jitter); each retry is logged as a warning naming the object. Reads
that fail part-way resume with a ranged GET from the byte already received.

Credentials are never logged or put into error messages: messages name the URL and, for
custom servers, the endpoint only.

Tuning through the environment: ``DISENT_S3_RETRIES`` (attempts after the first, default 10;
botocore's ``max_attempts``, which also bounds the resumes of one broken read; botocore's jittered
delays of up to 0.05 s x 2^n, capped at 20 s, make 10 retries ride out an outage of roughly
15-30 s before the rank fails with a retryable error; botocore's standard mode also keeps a retry
budget per client, which a long outage can spend, after which calls fail at once, still as
S3Unavailable, exit 69, for the launcher to restart),
``DISENT_S3_BACKOFF`` (first delay in seconds before resuming a broken read, default 0.5; doubled
each time, capped at 20 s). botocore's own backoff cannot be configured, so this knob applies to
the ranged resume only.
"""
from __future__ import annotations

import functools
import io
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

THROTTLE_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "SlowDown", "RequestLimitExceeded", "TooManyRequestsException", "RequestThrottled",
    "ProvisionedThroughputExceededException", "BandwidthLimitExceeded", "EC2ThrottledException",
})
TRANSIENT_CODES = frozenset({"InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeTooSkewed"})
MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchBucket"})

_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


class S3Error(OSError):
    """An S3 request failed for good (after retries, or not retryable). The message names the URL."""


class S3NotFound(S3Error, FileNotFoundError):
    """The bucket or object does not exist."""


class S3Unavailable(S3Error):
    """The endpoint kept failing (connection errors, 5xx, throttling) until the retries ran out."""


# --------------------------------------------------------------------------- URLs


def is_s3_url(url: str) -> bool:
    return isinstance(url, str) and url.startswith("s3://")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``; the key may be empty."""
    if not is_s3_url(url):
        raise ValueError(f"not an s3:// URL: {url!r}")
    rest = url[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 URL without a bucket: {url!r}")
    return bucket, key


def join_url(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


# --------------------------------------------------------------------------- clients and retries


def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _where() -> str:
    ep = endpoint_url()
    return f" (endpoint {ep})" if ep else ""


def client():
    """A boto3 S3 client for this process and the current environment (cached).

    Cached per process id, so DataLoader workers forked from a parent build their own.
    """
    import boto3
    from botocore.config import Config

    ep = endpoint_url()
    retries, _ = _retry_settings()
    # The cache key holds which settings are in force, not secrets themselves: a changed
    # key id or secret (tests switch servers) yields a different client.
    key = (
        os.getpid(), ep, os.environ.get("AWS_PROFILE"),
        os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        hash(os.environ.get("AWS_ACCESS_KEY_ID")), hash(os.environ.get("AWS_SECRET_ACCESS_KEY")), retries,
    )
    with _clients_lock:
        found = _clients.get(key)
        if found is not None:
            return found
        session = boto3.session.Session(profile_name=os.environ.get("AWS_PROFILE") or None)
        region = session.region_name or "us-east-1"
        config = Config(
            # botocore's max_attempts counts the retries after the first attempt, as DISENT_S3_RETRIES does.
            retries={"mode": "standard", "max_attempts": retries},
            connect_timeout=10,
            read_timeout=60,
            s3={"addressing_style": "path"} if ep else {},
            max_pool_connections=16,
        )
        made = session.client("s3", endpoint_url=ep, region_name=region, config=config)
        _log_retries(made, retries)
        _clients[key] = made
        return made


def _retry_settings() -> tuple[int, float]:
    retries = int(os.environ.get("DISENT_S3_RETRIES", "10"))
    backoff = float(os.environ.get("DISENT_S3_BACKOFF", "0.5"))
    return max(0, retries), max(0.0, backoff)


# botocore logs its retries at debug level only and without the object; these handlers put one
# warning per retry, naming s3://bucket/key and the failure, on this module's logger.


def _log_retries(made, retries: int) -> None:
    events = made.meta.events
    events.register("before-parameter-build.s3", _remember_url)
    # Runs after botocore's own needs-retry handler and returns None, so botocore's decision stands.
    events.register("needs-retry.s3", _remember_failure)
    # A request built for attempt 2 or later is a retry botocore decided on (after its backoff).
    events.register("request-created.s3", functools.partial(_warn_retry, retries))


def _remember_url(params, context, **_) -> None:
    bucket = params.get("Bucket")
    if bucket:
        context["disent_url"] = f"s3://{bucket}/{params.get('Key') or params.get('Prefix') or ''}"


def _remember_failure(request_dict, response=None, caught_exception=None, **_) -> None:
    if caught_exception is not None:
        failure = _describe(caught_exception)
    elif response is not None:
        http_response, parsed = response
        code = (parsed.get("Error") or {}).get("Code") if isinstance(parsed, dict) else None
        failure = f"{code or 'error'} (HTTP {http_response.status_code})"
    else:
        return
    request_dict["context"]["disent_failure"] = failure


def _warn_retry(retries: int, request, operation_name: str, **_) -> None:
    context = getattr(request, "context", None) or {}
    attempt = context.get("retries", {}).get("attempt", 1)
    if attempt > 1:
        log.warning("S3 %s of %s failed (%s); retry %d/%d", operation_name, context.get("disent_url", "?"),
                    context.get("disent_failure", "unknown error"), attempt - 1, retries)


def _status_and_code(exc: BaseException) -> tuple[int | None, str | None]:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None, None
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = response.get("Error", {}).get("Code")
    return status, (str(code) if code is not None else None)


def is_retryable(exc: BaseException) -> bool:
    """Throttling, 5xx and connection-level failures: what botocore retries, and what a broken read
    resumes from. Once the retries are spent these mean the endpoint is unavailable (S3Unavailable);
    4xx answers are final."""
    from botocore import exceptions as bex

    if isinstance(exc, bex.ClientError):
        status, code = _status_and_code(exc)
        if code in THROTTLE_CODES or code in TRANSIENT_CODES:
            return True
        return status is not None and (status >= 500 or status == 429)
    retryable = (
        bex.EndpointConnectionError, bex.ConnectionClosedError, bex.ReadTimeoutError,
        bex.ConnectTimeoutError, bex.ResponseStreamingError, bex.IncompleteReadError,
        bex.HTTPClientError,
    )
    if isinstance(exc, retryable):
        return True
    try:
        import urllib3.exceptions as u3

        if isinstance(exc, (u3.ProtocolError, u3.ReadTimeoutError, u3.IncompleteRead)):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, (ConnectionError, TimeoutError))


def _describe(exc: BaseException) -> str:
    status, code = _status_and_code(exc)
    if code or status:
        return f"{code or 'error'} (HTTP {status})"
    return f"{type(exc).__name__}: {exc}"


def _final_error(exc: BaseException, url: str, action: str) -> S3Error:
    status, code = _status_and_code(exc)
    if code in MISSING_CODES or status == 404:
        if code == "NoSuchBucket":
            return S3NotFound(f"{url}: the bucket does not exist{_where()}")
        return S3NotFound(f"{url}: no such object{_where()}")
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403") or status == 403:
        return S3Error(
            f"{url}: access denied while trying to {action}{_where()} ({code}); check the credentials "
            "(AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the instance role)"
        )
    kind = S3Unavailable if is_retryable(exc) else S3Error
    return kind(f"{url}: could not {action}{_where()}: {_describe(exc)}")


def _call(fn: Callable[[], Any], url: str, action: str) -> Any:
    """``fn()`` (one client call, which botocore retries); a failure it gives up on becomes an S3Error naming ``url``."""
    try:
        return fn()
    except S3Error:
        raise
    except Exception as exc:  # noqa: BLE001 - classified by _final_error
        raise _final_error(exc, url, action) from exc


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

        response = _call(get, self.url, "read")
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
        retries, backoff = _retry_settings()
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
                    raise _final_error(exc, self.url, "read") from exc
                # The body broke mid-stream (botocore does not retry reads of a returned body):
                # resume from self.pos with the same bound as botocore's attempts.
                self._discard_body()
                attempt += 1
                delay = min(20.0, backoff * (2 ** (attempt - 1))) * (0.5 + random.random() / 2)
                log.warning("S3 read of %s broke at byte %d (%s); resuming, retry %d/%d in %.2fs", self.url,
                            self.pos, _describe(exc), attempt, retries, delay)
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
        import tempfile

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
    import importlib

    # `webdataset.gopen` the attribute is the function; the dispatch table lives in the module.
    wds_gopen = importlib.import_module("webdataset.gopen")
    wds_gopen.gopen_schemes["s3"] = gopen_s3


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

    _call(put, url, "upload")


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
        page = _call(lambda: client().list_objects_v2(**kwargs), url, "list")
        for item in page.get("Contents", []):
            out.append(ObjectInfo(url=f"s3://{bucket}/{item['Key']}", key=item["Key"], size=int(item["Size"])))
        if not page.get("IsTruncated"):
            return out
        token = page.get("NextContinuationToken")


def exists(url: str) -> bool:
    bucket, key = parse_s3_url(url)
    try:
        _call(lambda: client().head_object(Bucket=bucket, Key=key), url, "inspect")
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
    _call(lambda: client().delete_object(Bucket=bucket, Key=key), url, "delete")


def create_bucket(name: str) -> None:
    """Create a bucket (used by tests and demos); an existing bucket owned by us is fine."""
    from botocore import exceptions as bex

    try:
        _call(lambda: client().create_bucket(Bucket=name), f"s3://{name}", "create the bucket")
    except S3Error as exc:
        cause = exc.__cause__
        if isinstance(cause, bex.ClientError) and _status_and_code(cause)[1] in (
            "BucketAlreadyOwnedByYou", "BucketAlreadyExists"
        ):
            return
        raise


register_gopen()
