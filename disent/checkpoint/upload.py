"""Copies of complete checkpoints to s3:// in background threads (COMPLETE last, as on disk). A failed
upload is logged and kept in `errors`; it never stops training."""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from disent.checkpoint.layout import COMPLETE
from disent.io.s3 import upload_file

log = logging.getLogger(__name__)


def _upload_file(local: Path, url: str) -> None:
    upload_file(str(local), url)


class CheckpointUploads:
    def __init__(self, base_url: str, uploader: Callable[[Path, str], None] | None = None):
        self.base_url = base_url.rstrip("/")
        self._upload = uploader or _upload_file
        self._threads: list[threading.Thread] = []
        self.errors: list[str] = []

    def start(self, path: Path, run_name: str) -> None:
        url = f"{self.base_url}/{run_name}/checkpoints/{path.name}"
        thread = threading.Thread(target=self._copy, args=(path, url), name="ckpt-upload", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _copy(self, path: Path, url: str) -> None:
        try:
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != COMPLETE)
            for file in files:
                self._upload(file, f"{url}/{file.relative_to(path).as_posix()}")
            self._upload(path / COMPLETE, f"{url}/{COMPLETE}")  # last, as on disk
            log.info("uploaded checkpoint %s to %s", path.name, url)
        except Exception as exc:  # an upload failure must not stop training
            msg = f"upload of checkpoint {path} to {url} failed: {exc}"
            self.errors.append(msg)
            log.warning(msg)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the uploads under way, all of them within `timeout` seconds (None: no bound); True when none is
        left running."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]
        return not self._threads
