"""The training metrics: every `train.log_every` steps, the loss terms averaged over the steps of
the window and over ranks, throughput and the time spent waiting for data, sent to MLflow and
run_dir/metrics.jsonl by rank 0 and shown by the progress report."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from disent import process_group
from disent.train.progress import ProgressReport


def stack_scalars(values: dict[str, torch.Tensor | float], device: torch.device) -> tuple[list[str], torch.Tensor]:
    """The scalars as one float32 tensor on `device`, in key order: the per-step terms live on the training
    device and the host's figures (data wait) on the CPU; torch.stack would refuse the mix."""
    keys = sorted(values)
    stacked = torch.stack([torch.as_tensor(values[k], device=device).float().reshape(()) for k in keys])
    return keys, stacked


def mean_over_ranks(values: dict[str, torch.Tensor | float], device: torch.device) -> dict[str, float]:
    """The rank average of each scalar (a collective: every rank calls it with the same keys), reduced on
    `device` (the process group's: the GPU under NCCL, the CPU under gloo). The one host-device sync of a
    log window is the read-back at the end."""
    keys, stacked = stack_scalars(values, device)
    world = process_group.rank_and_world()[1]
    if world > 1:
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked = stacked / world
    return dict(zip(keys, stacked.tolist()))


class TrainingMetrics:
    """Collects each step's loss terms and, at the end of a window, reduces and reports them.

    It reads the loader's own counters (`wait_seconds`, `skipped_shards`) and the engines' learning rates
    (`lrs()`); rank 0 (`is_main`) sends the window to the tracker and appends it to `file`."""

    def __init__(self, *, file: Path, log_every: int, last_step: int, global_batch: int, reduce_on: torch.device,
                 is_main: bool, tracker, progress: ProgressReport, loader, lrs: Callable[[], dict[str, float]]):
        self.file, self.log_every, self.last_step, self.global_batch = file, log_every, last_step, global_batch
        self.reduce_on, self.is_main, self.tracker, self.progress = reduce_on, is_main, tracker, progress
        self.loader, self.lrs = loader, lrs
        self._start_window()

    def _start_window(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.started = time.perf_counter()
        self.waited_before = self._loader_wait()

    def _loader_wait(self) -> float:
        return float(getattr(self.loader, "wait_seconds", 0.0))

    def record(self, step: int, terms: dict[str, torch.Tensor]) -> None:
        """Every rank, after every step."""
        for key, value in terms.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.steps += 1
        self.progress.update()
        if step % self.log_every == 0 or step == self.last_step:
            self.report(step)

    def report(self, step: int) -> None:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        waited = self._loader_wait() - self.waited_before
        local: dict[str, torch.Tensor | float] = {k: v / self.steps for k, v in self.sums.items()}
        local["data_wait_s"] = waited
        local["data_wait_fraction"] = waited / elapsed
        metrics = mean_over_ranks(local, self.reduce_on)
        metrics["samples_per_s"] = self.steps * self.global_batch / elapsed
        metrics["steps_per_s"] = self.steps / elapsed
        metrics.update(self.lrs())
        skipped = getattr(self.loader, "skipped_shards", None)
        if isinstance(skipped, (int, float)):
            metrics["data_skipped_shards"] = float(skipped)
        if self.is_main:
            self.tracker.log_metrics(metrics, step=step)
            with open(self.file, "a") as fh:
                fh.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")
            self.progress.report(step, metrics)
        self._start_window()
