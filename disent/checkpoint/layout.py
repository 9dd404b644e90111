"""Every path under run_dir, in one place: the checkpoints and their files, the evaluations, the final
export and the run's own records. Nothing else in disent joins names under run_dir."""
from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from disent.checkpoint.errors import CheckpointError
from disent.checkpoint.safe_load import safe_torch_load

COMPLETE = "COMPLETE"
META = "meta.json"
VAE_WEIGHTS = "vae_weights.pt"
STEP_DIR = re.compile(r"^step-(\d{8,})$")
EXPORTED_FILES = ("vae.pt", "config.yaml")  # an exported model folder: the weights and the training config


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def trainer_file(rank: int) -> str:
    return f"trainer-rank{rank}.pt"


@dataclass(frozen=True)
class RunLayout:
    """run_dir/
        checkpoints/step-N/   one checkpoint (CheckpointInfo)
        eval/step-N/          an in-training evaluation: eval.json and its PNG grids
        final/                {vae,disc}.pt and config.yaml at the end of a finished run (disent.load reads it)
        final/model/          the run's MLflow model (pyfunc)
        config.yaml           the resolved config;  deepspeed/{vae,disc}.json  each engine's DeepSpeed config
        metrics.jsonl         the training metrics;  profile/  torch.profiler traces
        summary.json          what the run did (disent/train/summary.py), written at its end
        .universal/           transient: ZeRO 1/2 states converted while resuming on another number of ranks
        .compile-cache/       torch.compile's Inductor cache (train.compile), shared by every rank and restart
    """

    run_dir: Path

    def __post_init__(self):
        object.__setattr__(self, "run_dir", Path(self.run_dir))

    def check_writable(self, clean_up: bool = True) -> None:
        """Proves that run_dir can be created and written (a probe file removed again, and with clean_up the folders
        it made), so a missing or read-only run_dir is one input error before any work instead of a crash at the
        first save. Ranks checking one run_dir side by side pass clean_up=False: one rank's removal would pull the
        folder from under another's probe."""
        made = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()] if clean_up else []
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise CheckpointError(
                f"run_dir {self.run_dir} cannot be written ({exc.strerror or exc}); set run_dir to a directory every "
                "rank can create and write (on a cluster, a shared file system)") from None
        finally:
            for folder in made:  # deepest first: a refused config leaves nothing behind
                with contextlib.suppress(OSError):
                    folder.rmdir()

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def summary(self) -> Path:
        return self.run_dir / "summary.json"

    @property
    def compile_cache(self) -> Path:
        return self.run_dir / ".compile-cache"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / step_dir_name(step)

    def eval_dir(self, step: int) -> Path:
        return self.run_dir / "eval" / step_dir_name(step)

    @property
    def final(self) -> Path:
        return self.run_dir / "final"

    @property
    def final_model(self) -> Path:
        return self.final / "model"

    @property
    def config(self) -> Path:
        return self.run_dir / "config.yaml"

    @property
    def deepspeed_configs(self) -> Path:
        return self.run_dir / "deepspeed"

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def profile(self) -> Path:
        return self.run_dir / "profile"

    @property
    def universal(self) -> Path:
        return self.run_dir / ".universal"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int

    @property
    def complete(self) -> bool:
        return (self.path / COMPLETE).is_file()

    @property
    def eval_dir(self) -> Path:
        """Where the evaluation of this checkpoint's step goes, the training's own or `disent eval`'s: one place per
        step, run_dir/eval/step-N (RunLayout.eval_dir); beside the checkpoint for one outside a run_dir."""
        if self.path.parent.name == "checkpoints":
            return RunLayout(self.path.parent.parent).eval_dir(self.step)
        return self.path / "eval"

    def meta(self) -> dict:
        return json.loads((self.path / META).read_text())

    def read_vae_weights(self) -> dict[str, torch.Tensor]:
        """The bare VAE's state_dict (what eval and swap load), read with weights_only."""
        weights = self.path / VAE_WEIGHTS
        if not weights.is_file():
            raise CheckpointError(f"checkpoint {self.path} has no {VAE_WEIGHTS}; it was written by an older disent")
        return safe_torch_load(weights, map_location="cpu", deepspeed_classes=False)  # a plain state_dict of ours


def list_checkpoints(checkpoint_root: Path) -> list[CheckpointInfo]:
    """Every step-* directory (complete or not), oldest first."""
    if not checkpoint_root.is_dir():
        return []
    found = []
    for child in checkpoint_root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append(CheckpointInfo(child, int(match.group(1))))
    return sorted(found, key=lambda c: c.step)
