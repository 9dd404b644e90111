"""Evaluation hooks run by the trainer every `train.eval_every` steps and at the end.

A hook is any callable `(trainer, step)`. The default one runs the full evaluation of
`disent.eval` on rank 0 (class probes on s and z, factor read-out, reconstruction and swap
errors, the swap / prior / interpolation grids, plus a reconstruction grid), writes
run_dir/eval/step-XXXXXXXX/{eval.json,*.png} and logs `eval/*` metrics and the PNGs to MLflow.
Other ranks do nothing and simply wait at the next collective. The trainer runs hooks under a
forked RNG, so evaluation never changes the training stream.
"""
from __future__ import annotations

import logging

import torch

from disent.eval import grids
from disent.eval.evaluate import Split, evaluate, in_float32, load_split, numeric_metrics, same_class_partners
from disent.eval.metrics import headline

log = logging.getLogger(__name__)


class EvaluationHook:
    def __init__(self):
        self._splits: tuple[Split, Split] | None = None  # read once, reused at every evaluation

    def _data(self, cfg) -> tuple[Split, Split]:
        if self._splits is None:
            self._splits = (load_split(cfg, cfg.data.train_split, cfg.eval.max_train_samples),
                            load_split(cfg, cfg.data.eval_split, cfg.eval.max_test_samples))
        return self._splits

    def __call__(self, trainer, step: int) -> None:
        if trainer.env.rank != 0:
            return
        cfg = trainer.cfg
        train, test = self._data(cfg)
        out = trainer.run_dir / "eval" / f"step-{step:08d}"
        vae = in_float32(trainer.engines.vae_model, cfg)
        was_training = vae.training
        vae.eval()
        try:
            metrics = evaluate(vae, cfg, out, trainer.env.device, train=train, test=test)
            # reconstruction grid: x1, Dec(mu1, s1), x1', Dec(mu1, s1') for same-class test pairs
            n = cfg.eval.grid_size
            partner = same_class_partners(test.labels, cfg.seed)[:n]
            x1 = torch.from_numpy(test.images[:n]).to(trainer.env.device).float().div_(255)
            x1p = torch.from_numpy(test.images[partner]).to(trainer.env.device).float().div_(255)
            grids.save_png(grids.reconstruction_grid(vae, x1, x1p), out / "reconstructions.png")
        finally:
            vae.train(was_training)
        trainer.tracker.log_metrics(numeric_metrics(metrics), step=step)
        trainer.tracker.log_artifact(out, f"eval/step-{step:08d}")
        log.info("eval at step %d: %s; grids in %s", step, headline(metrics), out)
