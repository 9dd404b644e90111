"""Framework overhead: samples/s of a full `disent train` step against a bare PyTorch loop.

    .venv/bin/python benchmarks/bench_overhead.py                          # Fashion-MNIST shards
    .venv/bin/python benchmarks/bench_overhead.py --steps 300 --threads 2 --url data/fashion_mnist

Both sides, measured in one run, single process, the same number of threads:

* framework: `disent train` as users run it — WebDataset PairLoader on real shards, both
  DeepSpeed engines (ZeRO 0, fp32), MLflow logging at the default interval to a local store,
  metrics every `train.log_every` steps. Its rate is the trainer's own `samples_per_s` averaged
  over the log windows after the first (warm-up); the final checkpoint and evaluation come after
  the last window and are not counted.
* bare: the same model, losses (`disent.models.objective`), AdamW optimizers and gradient
  clipping in a plain PyTorch loop on uint8 batches already in memory.

Prints one JSON object with both rates and framework/bare.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def framework_rate(config: str, url: str, steps: int, threads: int, workdir: Path, overrides: list[str]) -> dict:
    run_dir = workdir / "framework"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "disent.cli", "train", config, f"run_dir={run_dir}", f"data.url={url}",
           f"train.steps={steps}", "train.eval_every=1000000", "train.checkpoint_every=1000000",
           "train.progress=false", f"tracking.uri=sqlite:///{workdir}/mlflow.db", "tracking.system_metrics=false",
           "eval.max_train_samples=200", "eval.max_test_samples=100", *overrides]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    windows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [w["samples_per_s"] for w in windows[1:]]
    return {"samples_per_s": sum(rates) / len(rates), "windows": len(rates),
            "data_wait_fraction": sum(w["data_wait_fraction"] for w in windows[1:]) / len(rates)}


def bare_rate(config: str, steps: int, threads: int, overrides: list[str]) -> dict:
    import torch

    from disent.config import load_config
    from disent.models import DisentVAE, build_critics
    from disent.models.objective import discriminator_losses, vae_losses

    torch.set_num_threads(threads)
    cfg = load_config(ROOT / config, overrides)
    torch.manual_seed(cfg.seed)
    vae = DisentVAE(cfg.data.channels, cfg.data.image_size, cfg.model.s_dim, cfg.model.z_dim, cfg.model.base_channels)
    critics = build_critics(cfg.model.discriminator, cfg.data.channels, cfg.data.image_size, cfg.data.num_classes,
                            cfg.model.disc_channels, cfg.model.z_dim, cfg.loss.latent_adversarial > 0)
    opt_vae = torch.optim.AdamW(vae.parameters(), cfg.optim.vae.lr, betas=tuple(cfg.optim.vae.betas))
    opt_disc = torch.optim.AdamW(critics.parameters(), cfg.optim.disc.lr, betas=tuple(cfg.optim.disc.betas))
    b, shape = cfg.train.global_batch_size, (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    batches = [
        {k: torch.randint(0, 256, (b, *shape), dtype=torch.uint8) for k in ("x1", "x1p", "x2", "x2p")}
        | {"y2": torch.randint(0, cfg.data.num_classes, (b,))}
        for _ in range(8)
    ]

    def step(i: int) -> None:
        batch = batches[i % len(batches)]
        x = {k: batch[k].float().div_(255) for k in ("x1", "x1p", "x2", "x2p")}
        critics.requires_grad_(False)
        loss, _, fakes = vae_losses(vae, critics, x["x1"], x["x1p"], x["x2"], x["x2p"], batch["y2"], cfg.loss, i)
        opt_vae.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.train.grad_clip)
        opt_vae.step()
        critics.requires_grad_(True)
        d_loss, _ = discriminator_losses(critics, x["x2"], x["x2p"], batch["y2"], fakes, cfg.loss)
        opt_disc.zero_grad(set_to_none=True)
        d_loss.backward()
        torch.nn.utils.clip_grad_norm_(critics.parameters(), cfg.train.grad_clip)
        opt_disc.step()

    warmup = max(steps // 10, 5)
    for i in range(warmup):
        step(i)
    start = time.perf_counter()
    for i in range(steps - warmup):
        step(warmup + i)
    return {"samples_per_s": (steps - warmup) * b / (time.perf_counter() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/fashion_mnist.yaml")
    parser.add_argument("--url", default="data/fashion_mnist", help="prepared shards (disent prepare ...)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="config overrides for both sides")
    args = parser.parse_args()
    overrides = ["data.num_workers=0", *args.overrides]
    with tempfile.TemporaryDirectory() as tmp:
        bare = bare_rate(args.config, args.steps, args.threads, overrides)
        framework = framework_rate(args.config, args.url, args.steps, args.threads, Path(tmp), overrides)
    print(json.dumps({
        "config": args.config, "steps": args.steps, "threads": args.threads,
        "bare_pytorch": bare, "framework": framework,
        "framework_over_bare": framework["samples_per_s"] / bare["samples_per_s"],
    }, indent=2))


if __name__ == "__main__":
    main()
