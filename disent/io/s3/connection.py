"""S3 URLs, the boto3 client with botocore's standard retries (each retry logged, naming the object),
and the errors every other part raises."""
from __future__ import annotations

import functools
import logging
import os
import threading
from typing import Any, Callable

import boto3
import urllib3.exceptions as u3
from botocore import exceptions as bex
from botocore.config import Config

log = logging.getLogger("disent.io.s3")

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
    ep = endpoint_url()
    retries, _ = retry_settings()
    # The cache key holds which settings are in force, not secrets themselves: a changed
    # key id or secret (tests switch servers) yields a different client.
    key = (
        os.getpid(), ep, os.environ.get("AWS_PROFILE"),
        os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        hash(os.environ.get("AWS_ACCESS_KEY_ID")), hash(os.environ.get("AWS_SECRET_ACCESS_KEY")), retries,
        os.environ.get("AWS_MAX_ATTEMPTS"), os.environ.get("AWS_RETRY_MODE"),
    )
    with _clients_lock:
        found = _clients.get(key)
        if found is not None:
            return found
        session = boto3.session.Session(profile_name=os.environ.get("AWS_PROFILE") or None)
        region = session.region_name or "us-east-1"
        config = Config(
            retries=_retries_unless_set(session, retries),
            connect_timeout=10,
            read_timeout=60,
            s3={"addressing_style": "path"} if ep else {},
            max_pool_connections=16,
        )
        made = session.client("s3", endpoint_url=ep, region_name=region, config=config)
        _log_retries(made, retries)
        _clients[key] = made
        return made


def _retries_unless_set(session, retries: int) -> dict:
    """The project's retries (standard mode, DISENT_S3_RETRIES) only where the user set none: a `retries` key in a
    client's Config overrides AWS_MAX_ATTEMPTS / AWS_RETRY_MODE and the profile's max_attempts / retry_mode, which
    botocore reads by itself when the key is absent."""
    out = {}
    if session._session.get_config_variable("retry_mode") is None:
        out["mode"] = "standard"
    if session._session.get_config_variable("max_attempts") is None:
        out["max_attempts"] = retries  # botocore's max_attempts counts the retries after the first, as ours does
    return out


def retry_settings() -> tuple[int, float]:
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
        failure = describe(caught_exception)
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


def status_and_code(exc: BaseException) -> tuple[int | None, str | None]:
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
    if isinstance(exc, bex.ClientError):
        status, code = status_and_code(exc)
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
    if isinstance(exc, (u3.ProtocolError, u3.ReadTimeoutError, u3.IncompleteRead)):
        return True
    return isinstance(exc, (ConnectionError, TimeoutError))


def describe(exc: BaseException) -> str:
    status, code = status_and_code(exc)
    if code or status:
        return f"{code or 'error'} (HTTP {status})"
    return f"{type(exc).__name__}: {exc}"


def final_error(exc: BaseException, url: str, action: str) -> S3Error:
    status, code = status_and_code(exc)
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
    return kind(f"{url}: could not {action}{_where()}: {describe(exc)}")


def call(fn: Callable[[], Any], url: str, action: str) -> Any:
    """``fn()`` (one client call, which botocore retries); a failure it gives up on becomes an S3Error naming ``url``."""
    try:
        return fn()
    except S3Error:
        raise
    except Exception as exc:  # noqa: BLE001 - classified by final_error
        raise final_error(exc, url, action) from exc
