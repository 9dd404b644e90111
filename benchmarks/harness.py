"""What the training benchmarks share: a bare PyTorch training loop, a timed `disent train` run,
and alternating rounds (these machines are noisy, so the two sides of a ratio are measured in
turns, A B A B ..., and the median of the per-round ratios is reported)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The measured part of a `disent train` run skips evaluation and checkpoints in the middle; the
# final ones come after the last log window and are not counted.
QUIET_TRAINING = ["train.eval_every=1000000", "train.checkpoint_every=1000000", "train.progress=false",
                  "tracking.system_metrics=false", "eval.max_train_samples=200", "eval.max_test_samples=100"]


class BareLoop:
    """The model, losses, AdamW optimizers and gradient clipping of `disent train` in a plain
    PyTorch loop on uint8 batches already in memory: the floor the framework is measured against."""

    def __init__(self, config: str, overrides: list[str], threads: int, device: str = "cpu"):
        import torch

        from disent.config import load_config
        from disent.models.discriminator import critics_from_config
        from disent.models.objective import Objective
        from disent.models.vae import vae_from_config

        torch.set_num_threads(threads)
        cfg = self.cfg = load_config(ROOT / config, overrides)
        torch.manual_seed(cfg.seed)
        self.device = torch.device(device)
        self.vae = vae_from_config(cfg).to(self.device)
        self.critics = critics_from_config(cfg).to(self.device)
        self.objective = Objective(cfg.loss, cfg.data.num_classes)
        self.opt_vae = torch.optim.AdamW(self.vae.parameters(), cfg.optim.vae.lr, betas=tuple(cfg.optim.vae.betas))
        self.opt_disc = torch.optim.AdamW(self.critics.parameters(), cfg.optim.disc.lr,
                                          betas=tuple(cfg.optim.disc.betas))
        b, shape = cfg.train.global_batch_size, (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        self.batch_size = b
        self.batches = [
            {k: torch.randint(0, 256, (b, *shape), dtype=torch.uint8) for k in ("x1", "x1p", "x2", "x2p")}
            | {y: torch.randint(0, cfg.data.num_classes, (b,)) for y in ("y1", "y2")}
            for _ in range(8)
        ]
        self.steps_done = 0

    def step(self) -> None:
        import torch

        cfg = self.cfg
        batch = self.batches[self.steps_done % len(self.batches)]
        x = {k: batch[k].to(self.device).float().div_(255) for k in ("x1", "x1p", "x2", "x2p")}
        y1, y2 = batch["y1"].to(self.device), batch["y2"].to(self.device)
        self.critics.requires_grad_(False)
        loss, _, fakes = self.objective.vae_losses(self.vae, self.critics, x["x1"], x["x1p"], x["x2"], x["x2p"], y2,
                                                   self.steps_done, y1=y1)
        self.opt_vae.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), cfg.train.grad_clip)
        self.opt_vae.step()
        self.critics.requires_grad_(True)
        d_loss, _ = self.objective.discriminator_losses(self.critics, x["x2"], x["x2p"], y2, fakes)
        self.opt_disc.zero_grad(set_to_none=True)
        d_loss.backward()
        torch.nn.utils.clip_grad_norm_(self.critics.parameters(), cfg.train.grad_clip)
        self.opt_disc.step()
        self.steps_done += 1

    def rate(self, steps: int, warmup: int = 5) -> dict:
        """Samples/s over `steps` steps after `warmup` untimed ones."""
        import torch

        for _ in range(warmup):
            self.step()
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync()
        seconds = time.perf_counter() - start
        return {"samples_per_s": steps * self.batch_size / seconds, "step_ms": 1000 * seconds / steps}


def train_rate(config: str, url: str, steps: int, run_dir: Path, overrides: list[str], nproc: int = 1,
               threads_per_rank: int = 1) -> dict:
    """Run `disent train` (through the launcher when nproc > 1) and read back its own throughput:
    the mean `samples_per_s` and `data_wait_fraction` of its log windows after the first (warm-up)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_rank), "MKL_NUM_THREADS": str(threads_per_rank),
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    train = [sys.executable, "-m", "disent.cli", "train", config, f"run_dir={run_dir}", f"data.url={url}",
             f"train.steps={steps}", f"tracking.uri=sqlite:///{run_dir}/mlflow.db", *QUIET_TRAINING, *overrides]
    cmd = [sys.executable, "-m", "launcher", "--nproc", str(nproc), "--", *train] if nproc > 1 else train
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed ({result.returncode}):\n{result.stderr[-3000:]}")
    windows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = windows[1:] or windows
    return {"samples_per_s": statistics.fmean(w["samples_per_s"] for w in timed),
            "data_wait_fraction": statistics.fmean(w["data_wait_fraction"] for w in timed),
            "windows": len(timed)}


def alternate(rounds: int, baseline: Callable[[int], dict], candidate: Callable[[int], dict]) -> dict:
    """Run baseline(i) then candidate(i) for each round i; report every round and median rates/ratio."""
    rows = []
    for i in range(rounds):
        base, cand = baseline(i), candidate(i)
        rows.append({"baseline": base, "candidate": cand, "ratio": cand["samples_per_s"] / base["samples_per_s"]})
        print(f"round {i + 1}/{rounds}: {base['samples_per_s']:.1f} vs {cand['samples_per_s']:.1f} samples/s "
              f"-> {rows[-1]['ratio']:.3f}", file=sys.stderr)
    return {
        "rounds": rows,
        "baseline_samples_per_s": statistics.median(r["baseline"]["samples_per_s"] for r in rows),
        "candidate_samples_per_s": statistics.median(r["candidate"]["samples_per_s"] for r in rows),
        "ratio": statistics.median(r["ratio"] for r in rows),
    }
