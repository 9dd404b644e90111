"""The launcher's one error kind."""
from __future__ import annotations


class LaunchError(RuntimeError):
    """A setting the user must fix. The CLI prints `launcher: error: ...` and exits 2."""
