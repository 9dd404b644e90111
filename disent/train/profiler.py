"""`train.profile_steps`: a torch.profiler trace of a few training steps."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from disent.io.storage import write_bytes_atomic

log = logging.getLogger(__name__)

PROFILE_SKIP_STEPS = 5  # start-up and the first log window are not what a profile should show


class StepProfiler:
    """torch.profiler over `steps` training steps after PROFILE_SKIP_STEPS: every rank writes a
    Chrome trace (chrome://tracing, Perfetto) to run_dir/profile/, rank 0 logs its trace and a
    table of the most expensive operators to MLflow. With steps=0 it does nothing. A context
    manager: the profiler stops when the block ends, however it ends."""

    def __init__(self, steps: int, steps_left: int, out: Path, rank: int, tracker):
        self.out = out
        self.rank, self.tracker = rank, tracker
        self._profile = None
        if steps > 0:
            self._start(steps, steps_left)

    def _start(self, steps: int, steps_left: int) -> None:
        skip = max(0, min(PROFILE_SKIP_STEPS, steps_left - 1 - steps))  # short runs still get their trace
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._profile = profile(activities=activities, record_shapes=False, on_trace_ready=self._write,
                                schedule=schedule(wait=skip, warmup=1, active=steps, repeat=1))
        self._profile.start()

    def _write(self, prof) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        trace = self.out / f"trace-rank{self.rank}.json"
        prof.export_chrome_trace(str(trace))
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=25)
        top_ops = self.out / f"top-ops-rank{self.rank}.txt"
        write_bytes_atomic(str(top_ops), (table + "\n").encode())
        if self.rank == 0:
            log.info("profile written to %s; most expensive operators:\n%s", self.out, table)
            self.tracker.log_artifact(trace, "profile")
            self.tracker.log_artifact(top_ops, "profile")

    def step(self) -> None:
        if self._profile is not None:
            self._profile.step()

    def __enter__(self) -> "StepProfiler":
        return self

    def __exit__(self, *exc) -> bool:
        if self._profile is not None:
            self._profile.stop()
        return False
