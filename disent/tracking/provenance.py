"""Where the code of a run came from: the git commit (with -dirty for uncommitted changes)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """$DISENT_GIT_COMMIT or $GIT_COMMIT, else HEAD of the checkout at path (default: this package's)."""
    for var in ("DISENT_GIT_COMMIT", "GIT_COMMIT"):
        if os.environ.get(var):
            return os.environ[var]
    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    if not commit:
        return None
    try:
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty = ""
    return commit + ("-dirty" if dirty else "")
