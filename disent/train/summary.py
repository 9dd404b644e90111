"""What a run actually did, reported once at its end: what was asked is in the config, this is what ran.

Wall time, steps, the first step's seconds (start-up and compilation show there), the dtype the decoder's
convolutions produced (bf16 under autocast, or not), the peak GPU memory, torch.compile's counters (frames
compiled, graphs, graph breaks), and the last step's losses. Rank 0 logs one line, writes run_dir/summary.json
and logs the numbers to MLflow under summary/.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def compile_counters() -> dict[str, int]:
    """torch.compile's counters so far: frames compiled (each recompile is one more), graphs, graph breaks."""
    from torch._dynamo.utils import counters  # lazy: ~1.3 s to import, and only a compiled run has any

    return {"compile_frames": int(counters["frames"]["total"]), "compile_graphs": int(counters["stats"]["unique_graphs"]),
            "compile_graph_breaks": int(sum(counters["graph_break"].values()))}


class RunSummary:
    def __init__(self, device: torch.device, compiled: bool, global_batch: int):
        self.device, self.compiled, self.global_batch = device, compiled, global_batch
        self.started = time.monotonic()
        self.figures: dict = {"steps": 0}
        self._last_terms: dict[str, torch.Tensor] = {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def step(self, terms: dict[str, torch.Tensor], output_dtype: torch.dtype | None = None) -> None:
        """After each step: the first one's seconds and the decoder's output dtype; the terms of the latest."""
        self.figures["steps"] += 1
        if self.figures["steps"] == 1:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.figures["first_step_s"] = round(time.monotonic() - self.started, 2)
            self.figures["decoder_output_dtype"] = str(output_dtype).removeprefix("torch.") if output_dtype else None
        self._last_terms = terms

    def report(self, status: str, path: Path, tracker, is_main: bool, step: int) -> dict:
        """The figures (read from the device once, here), logged by rank 0. Never raises: the run's own outcome
        decides how it ends, not its report (a failure is a warning)."""
        try:
            return self._report(status, path, tracker, is_main, step)
        except Exception as exc:  # noqa: BLE001
            log.warning("the run summary failed: %s: %s", type(exc).__name__, exc)
            return {}

    def _report(self, status: str, path: Path, tracker, is_main: bool, step: int) -> dict:
        wall = time.monotonic() - self.started
        figures = {**self.figures, "status": status, "wall_s": round(wall, 1),
                   "samples_per_s": round(self.figures["steps"] * self.global_batch / max(wall, 1e-9), 1)}
        for key in ("vae_loss", "disc_loss"):
            if key in self._last_terms:
                figures[f"last_{key}"] = float(self._last_terms[key])
        if self.device.type == "cuda":
            figures["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        if self.compiled:
            figures.update(compile_counters())
        if is_main:
            path.write_text(json.dumps(figures, indent=2, sort_keys=True))
            tracker.log_metrics({f"summary/{k}": float(v) for k, v in figures.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=step)
            log.info("run summary: %s; in %s", ", ".join(f"{k} {v}" for k, v in figures.items()), path)
        return figures
