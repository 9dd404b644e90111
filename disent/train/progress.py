"""Rank 0's progress display."""
from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger(__name__)


class ProgressReport:
    """Rank 0's view of training progress: a tqdm bar on a terminal; elsewhere (an sbatch output file,
    `kubectl logs`, CI) one plain log line per `train.log_every` steps, since a redrawn bar written
    to a file is one endless line of carriage returns."""

    SHOWN = ("vae_loss", "disc_loss", "samples_per_s")

    def __init__(self, name: str, start: int, total: int, bar: bool):
        self.start, self.total = start, total
        self.t0 = time.perf_counter()
        self.bar = None
        if bar and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=start, desc=name, unit="step", dynamic_ncols=True)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def report(self, step: int, metrics: dict[str, float]) -> None:
        short = {k: metrics[k] for k in self.SHOWN if k in metrics}
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in short.items()}, refresh=False)
            return
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        log.info("step %d/%d %s eta %s", step, self.total, " ".join(f"{k}={v:.4g}" for k, v in short.items()),
                 _duration(eta))

    def __enter__(self) -> "ProgressReport":
        return self

    def __exit__(self, *exc) -> bool:
        if self.bar is not None:
            self.bar.close()
        return False


def _duration(seconds: float) -> str:
    if seconds != seconds:  # nan: nothing measured yet
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"
