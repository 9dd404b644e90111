"""Data errors, one per kind of failure (disent.errors):

- DataError is input: bad input to `disent prepare`, a missing manifest, or a manifest that does not
  fit the config. Raised before any work starts; exit 2, never retried.
- DataUnavailable and ShardError happen at run time: storage unreachable past its retries, or a
  shard that cannot be used once training reads it. Exit 69: the launcher, Slurm and Kubernetes
  restart the job, which resumes from its latest checkpoint.
"""
from __future__ import annotations

from disent.config import ConfigError
from disent.errors import RetryableFailure


class DataError(ConfigError):
    """Bad input to `disent prepare`, a missing manifest, or a manifest that does not fit the config."""


class DataUnavailable(RetryableFailure):
    """The storage holding the data (an S3 endpoint) did not answer within its retries."""


class ShardError(RetryableFailure):
    """A shard that cannot be used: missing, unreadable, truncated, corrupt or failing its checksum.

    With ``data.on_error: raise`` (the default) the loader raises this, naming the shard; with
    ``skip`` it counts the shard, warns once and goes on.
    """

    def __init__(self, message: str, shard: str = ""):
        super().__init__(message)
        self.shard = shard

    def __reduce__(self):  # DataLoader workers pickle it to the rank; keep the shard
        return type(self), (str(self), self.shard)


# What a shard that was read whole says when its content is wrong (rather than when it could not be read).
_CORRUPT = ("truncated", "fails its checksum", "does not match its manifest", "corrupt shard", "outside 0..",
            "holds images", "holds factors")


def wrong_local_content(exc: ShardError) -> bool:
    """A local shard whose bytes are wrong: read the same on every restart, so an input error (exit 2), not a failure
    to retry. A missing or unreadable one may come back (a file system that hiccups, data moved back): that stays
    retryable, as every S3 error does."""
    return bool(exc.shard) and not exc.shard.startswith("s3://") and any(m in str(exc) for m in _CORRUPT)


def unwrap_worker_error(exc: ShardError) -> ShardError:
    """A DataLoader worker's exception arrives rebuilt around the worker's whole traceback; keep the
    original one-line message, which names the shard."""
    text = str(exc)
    if "Original Traceback" not in text:
        return exc
    last = [line for line in text.splitlines() if line.strip()][-1]
    name, _, rest = last.partition(": ")  # "disent.data.errors.ShardError: shard ..."
    message = rest if rest and name.rsplit(".", 1)[-1] == type(exc).__name__ else last
    shard = message.split()[1].rstrip(":") if message.startswith("shard ") else ""
    return type(exc)(message, shard)
