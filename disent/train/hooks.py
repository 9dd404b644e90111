"""Evaluation hooks, run by the trainer every `train.eval_every` steps and at the end.

A hook is any callable taking an :class:`EvalRequest`: what it may read (the models being trained,
the config, the device, the tracker) and where it writes (`out_dir`, run_dir/eval/step-N, from the
checkpoint package's layout). The default hook runs the full evaluation of `disent.eval` on rank 0
(class probes on s and z, factor read-out, reconstruction and swap errors, the swap / prior /
interpolation grids, plus a reconstruction grid), writes eval.json and the PNGs into `out_dir` and
logs `eval/*` metrics and the PNGs to MLflow. Other ranks return at once; the trainer makes them wait
for rank 0 (disent/train/distributed.py) and runs hooks under a forked RNG, so evaluation never
changes the training stream.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from disent.config import Config
from disent.eval import grids
from disent.eval.evaluate import Split, evaluate, for_evaluation, load_split, numeric_metrics, same_class_partners
from disent.eval.metrics import headline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalRequest:
    step: int
    models: dict[str, torch.nn.Module]  # "vae" (the bare DisentVAE) and "disc", as they are being trained
    cfg: Config
    device: torch.device
    rank: int
    out_dir: Path  # run_dir/eval/step-N
    tracker: Any  # MLflowLogger (rank 0 logs)

    @property
    def vae(self) -> torch.nn.Module:
        return self.models["vae"]


class EvaluationHook:
    def __init__(self):
        self._splits: tuple[Split, Split] | None = None  # read once, reused at every evaluation

    def _data(self, cfg) -> tuple[Split, Split]:
        if self._splits is None:
            self._splits = (load_split(cfg, cfg.data.train_split, cfg.eval.max_train_samples),
                            load_split(cfg, cfg.data.eval_split, cfg.eval.max_test_samples))
        return self._splits

    def __call__(self, request: EvalRequest) -> None:
        if request.rank != 0:
            return
        cfg, out, device = request.cfg, request.out_dir, request.device
        train, test = self._data(cfg)
        vae = for_evaluation(request.vae, cfg)
        was_training = vae.training
        vae.eval()
        try:
            metrics = evaluate(vae, cfg, out, device, train=train, test=test)
            # reconstruction grid: x1, Dec(mu1, s1), x1', Dec(mu1, s1') for same-class test pairs
            n = cfg.eval.grid_size
            partner = same_class_partners(test.labels, cfg.seed)[:n]
            x1 = torch.from_numpy(test.images[:n]).to(device).float().div_(255)
            x1p = torch.from_numpy(test.images[partner]).to(device).float().div_(255)
            grids.save_png(grids.reconstruction_grid(vae, x1, x1p), out / "reconstructions.png")
        finally:
            vae.train(was_training)
        request.tracker.log_metrics(numeric_metrics(metrics), step=request.step)
        request.tracker.log_artifact(out, f"eval/{out.name}")
        log.info("eval at step %d: %s; grids in %s", request.step, headline(metrics), out)
        if metrics.get("failed_metrics"):  # the others are logged and written; the failure is reported as one
            raise RuntimeError("eval metrics failed: " + "; ".join(f"{k}: {v}" for k, v in metrics["failed_metrics"].items()))
