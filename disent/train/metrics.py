"""The training metrics: every `train.log_every` steps, the loss terms averaged over the steps of
the window and over ranks, throughput and the time spent waiting for data, sent to MLflow and
run_dir/metrics.jsonl by rank 0 and shown by the progress report."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

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
    import torch.distributed as dist

    keys, stacked = stack_scalars(values, device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked = stacked / dist.get_world_size()
    return dict(zip(keys, stacked.tolist()))


class TrainingMetrics:
    """Collects each step's loss terms and, at the end of a window, reduces and reports them."""

    def __init__(self, trainer, progress: ProgressReport):
        self.trainer = trainer
        self.progress = progress
        self.file = Path(trainer.run_dir) / "metrics.jsonl"
        self._start_window()

    def _start_window(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.started = time.perf_counter()
        self.waited_before = self._loader_wait()

    def _loader_wait(self) -> float:
        return float(getattr(self.trainer.loader, "wait_seconds", 0.0))

    def record(self, step: int, terms: dict[str, torch.Tensor]) -> None:
        """Every rank, after every step."""
        for key, value in terms.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.steps += 1
        self.progress.update()
        cfg = self.trainer.cfg.train
        if step % cfg.log_every == 0 or step == cfg.steps:
            self.report(step)

    def report(self, step: int) -> None:
        trainer = self.trainer
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        waited = self._loader_wait() - self.waited_before
        local: dict[str, torch.Tensor | float] = {k: v / self.steps for k, v in self.sums.items()}
        local["data_wait_s"] = waited
        local["data_wait_fraction"] = waited / elapsed
        metrics = mean_over_ranks(local, trainer.env.device if trainer.env.backend == "nccl" else torch.device("cpu"))
        metrics["samples_per_s"] = self.steps * trainer.cfg.train.global_batch_size / elapsed
        metrics["steps_per_s"] = self.steps / elapsed
        metrics.update(trainer.engines.lrs())
        skipped = getattr(trainer.loader, "skipped_shards", None)
        if isinstance(skipped, (int, float)):
            metrics["data_skipped_shards"] = float(skipped)
        if trainer.env.is_main:
            trainer.tracker.log_metrics(metrics, step=step)
            with open(self.file, "a") as fh:
                fh.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")
            self.progress.report(step, metrics)
        self._start_window()
