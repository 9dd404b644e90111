"""The checkpoint package's one error, apart so that every module of the package can raise it."""
from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (incomplete, missing, written by another world size)."""
