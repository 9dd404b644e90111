"""Every shipped config, at its real model size, under ZeRO 0, 1 and 2 on 2 ranks.

"Shipped" means every file in configs/ and the config embedded in k8s/job.yaml's ConfigMap, found
anew at each run, so a config added later is covered without touching this file. Each case builds
both DeepSpeed engines from the config as shipped and trains a few steps on small real shards of
the config's image shape. Only what this machine cannot run, or cannot run in the suite's time, is
changed (`cpu_adaptations`); the model (`model.*`, the data shape) never is. The buckets each one derives,
in-process: tests/unit/test_shipped_config_buckets.py.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import yaml

from disent.config import load_config
from disent.train.ds_config import bucket_size
from disent.train.engines import build_modules
from tests.support.train_helpers import STAGES, metric_lines, shipped_configs, step_dir, torchrun

STEPS = 3
CPU_BATCH = 16  # global; a GPU config's 2048 would take minutes a step on 2 CPU cores


def cpu_adaptations(cfg, stage: int) -> dict[str, object]:
    """What changes on this machine, and why; nothing that sizes the model."""
    out: dict[str, object] = {"train.zero_stage": stage}
    if stage > 0 and cfg.train.channels_last:
        out["train.channels_last"] = False  # refused with ZeRO 1/2: they flatten parameters into views
    if cfg.train.precision == "fp16":
        out["train.precision"] = "bf16"  # fp16 loss scaling is a CUDA path
    if cfg.train.compile:
        # inductor's CPU build takes ~90 s per run here; test_compiled_gpu_config_at_real_size covers it
        out["train.compile"] = False
    if cfg.train.global_batch_size > CPU_BATCH:
        out["train.global_batch_size"] = CPU_BATCH
        if cfg.train.batch_per_rank is not None:
            out["train.batch_per_rank"] = "null"  # the per-GPU batch it was sized for
    return out


def where_to_run(case_dir: Path, data_url: Path) -> dict[str, object]:
    """Local shards, a local MLflow store, no uploads: the shipped ones point at a cluster's S3 and servers."""
    return {
        "run_dir": case_dir, "data.url": data_url, "tracking.uri": f"sqlite:///{case_dir.parent}/mlflow.db",
        "train.checkpoint_upload_url": "null", "train.steps": STEPS, "train.checkpoint_every": STEPS,
        "train.log_every": 1, "train.progress": "false", "train.eval_every": 10**6, "train.device": "cpu",
    }


def training_signature(path: Path, changes: dict) -> str:
    """What a case trains, as text: two shipped configs with the same signature (a multi-node file that differs
    from its single-node parent only in paths, workers and cluster addresses) train the same model the same
    way on this machine, so the suite trains it once."""
    from disent.config import to_dict

    cfg = to_dict(load_config(path, [f"{k}={v}" for k, v in changes.items()]))
    for section, keys in (("data", ("url", "num_workers", "prefetch_factor", "streams")),
                          ("train", ("steps", "checkpoint_upload_url", "checkpoint_every", "keep_checkpoints",
                                     "eval_every", "log_every", "progress"))):
        for key in keys:
            cfg[section].pop(key)
    for key in ("name", "run_dir", "tracking", "eval"):
        cfg.pop(key)
    return json.dumps(cfg, sort_keys=True)


def data_shape(cfg) -> tuple[int, int, int]:
    return cfg.data.image_size, cfg.data.channels, cfg.data.num_classes


def make_shards(out: Path, shape: tuple[int, int, int], samples: int = 240) -> Path:
    """Real shards (`disent prepare npz:`) of one image shape; each class lights up its own band."""
    from disent.cli import main as disent_main

    size, channels, classes = shape
    rng = np.random.default_rng(0)
    labels = np.arange(samples) % classes
    images = rng.integers(0, 60, (samples, size, size, channels), dtype=np.uint8)
    band = max(1, size // classes)
    for i, y in enumerate(labels):
        images[i, (y * band) % size: (y * band) % size + band] = 230
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "data.npz", images=images.squeeze(-1) if channels == 1 else images, labels=labels)
    assert disent_main(["prepare", f"npz:{out / 'data.npz'}", str(out / "shards"), "--no-progress",
                        "--groups-per-shard", "8", "--overwrite"]) == 0
    return out / "shards"


def test_every_shipped_config_trains_under_zero_0_1_2_on_two_ranks_and_resumes_on_one(tmp_path):
    """All cases in one 2-rank process group (one start-up); each case builds both engines at the
    config's real size, trains STEPS steps and writes a complete checkpoint; then all of them resume
    on one rank."""
    configs = shipped_configs(tmp_path)
    shards: dict[tuple, Path] = {}
    cases, expected, trained = [], [], {}
    for name, path in configs.items():
        cfg = load_config(path)
        shape = data_shape(cfg)
        if shape not in shards:
            shards[shape] = make_shards(tmp_path / f"data-{'x'.join(map(str, shape))}", shape)
        for stage in STAGES:
            i = len(cases)
            changes = cpu_adaptations(cfg, stage)
            assert not any(k.startswith("model.") or k.startswith("data.") for k in changes)
            signature = (stage, training_signature(path, changes))
            if signature in trained:  # the same model trained the same way: covered by that case
                continue
            trained[signature] = name
            overrides = {**changes, **where_to_run(tmp_path / "cases" / f"case{i}", shards[shape])}
            cases.append(" ".join([f"config={path}", *(f"{k}={v}" for k, v in overrides.items())]))
            vae, disc = build_modules(load_config(path, ["train.compile=false"]))
            expected.append((name, stage, sum(p.numel() for p in vae.parameters()),
                             sum(p.numel() for p in disc.parameters())))
    args = ["--no-hooks", f"run_dir={tmp_path / 'cases'}"]
    for case in cases:
        args += ["--case", case]
    result = torchrun(args, timeout=1200, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    for i, (name, stage, vae_params, disc_params) in enumerate(expected):
        run_dir = tmp_path / "cases" / f"case{i}" / f"case{i}"
        label = f"{name} ZeRO {stage}"
        assert (step_dir(run_dir, STEPS) / "COMPLETE").exists(), label
        lines = metric_lines(run_dir)
        assert [m["step"] for m in lines] == list(range(1, STEPS + 1)), label
        assert all(math.isfinite(m["vae_loss"]) and math.isfinite(m["disc_loss"]) for m in lines), label
        for engine, params in (("vae", vae_params), ("disc", disc_params)):
            ds = json.loads((run_dir / "deepspeed" / f"{engine}.json").read_text())
            assert ds["zero_optimization"]["stage"] == stage, label
            if stage:
                assert ds["zero_optimization"]["allgather_bucket_size"] == bucket_size(params), label
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert saved["model"] == dataclasses.asdict(load_config(configs[name]).model), label  # the real size

    # The same cases resumed on one rank for one more step: every engine of every shipped config, at its
    # real size, reshards (ZeRO 1/2 through DeepSpeed's universal checkpoint conversion).
    one_more = [case.replace(f"train.steps={STEPS}", f"train.steps={STEPS + 1}") for case in cases]
    args = ["--no-hooks", f"run_dir={tmp_path / 'cases'}"]
    for case in one_more:
        args += ["--case", case]
    result = torchrun(args, nproc=1, timeout=1200, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stderr.count("written by 2 ranks; resharded onto 1") == len(cases), result.stderr[-6000:]
    for i, (name, stage, _, _) in enumerate(expected):
        run_dir = tmp_path / "cases" / f"case{i}" / f"case{i}"
        assert (step_dir(run_dir, STEPS + 1) / "COMPLETE").exists(), f"{name} ZeRO {stage}"
        lines = metric_lines(run_dir)
        assert [m["step"] for m in lines] == list(range(1, STEPS + 2)), f"{name} ZeRO {stage}"
        assert math.isfinite(lines[-1]["vae_loss"]), f"{name} ZeRO {stage}"


def test_compiled_gpu_config_at_real_size(tmp_path):
    """The first shipped config with train.compile (the multi-node GPU one) exactly as shipped, bf16,
    channels_last and torch.compile included: only its batch and where it runs change."""
    configs = shipped_configs(tmp_path)
    name, path = next((n, p) for n, p in configs.items() if load_config(p).train.compile)
    cfg = load_config(path)
    data = make_shards(tmp_path / "data", data_shape(cfg))
    overrides = {"train.global_batch_size": min(cfg.train.global_batch_size, CPU_BATCH),
                 "train.batch_per_rank": "null",  # the per-GPU batch it is sized for, on 32 ranks
                 **where_to_run(tmp_path / "run", data)}
    result = torchrun(["--no-hooks", f"--config={path}", *(f"{k}={v}" for k, v in overrides.items())],
                      timeout=900, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, name + result.stdout[-3000:] + result.stderr[-6000:]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["compile"] and saved["train"]["channels_last"] and saved["train"]["precision"] == "bf16"
    lines = metric_lines(tmp_path / "run")
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    assert all(math.isfinite(m["vae_loss"]) for m in lines)
