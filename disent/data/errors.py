"""Data errors. Both subclass ConfigError, so the CLI prints them as one paragraph and exits 2."""
from __future__ import annotations

from disent.config import ConfigError


class DataError(ConfigError):
    """Bad input to `disent prepare`, a missing manifest, or a manifest that does not fit the config."""


class ShardError(DataError):
    """A shard that cannot be used: missing, unreadable, truncated, corrupt or failing its checksum.

    With ``data.on_error: raise`` (the default) the loader raises this, naming the shard; with
    ``skip`` it counts the shard, warns once and goes on.
    """

    def __init__(self, message: str, shard: str = ""):
        super().__init__(message)
        self.shard = shard
