"""Saving, finding, loading and pruning the checkpoints of one run_dir (see disent/checkpoint/__init__.py)."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from disent import process_group
from disent.errors import RetryableFailure
from disent.checkpoint.files import atomic_torch_save, atomic_write_bytes, cpu_state, export_models, fsync_tree
from disent.checkpoint.layout import (COMPLETE, META, STEP_DIR, VAE_WEIGHTS, CheckpointError, CheckpointInfo,
                                      RunLayout, list_checkpoints, trainer_file)
from disent.checkpoint.reshard import load_engine, universal_copies
from disent.checkpoint.safe_load import safe_torch_load
from disent.checkpoint.upload import CheckpointUploads

log = logging.getLogger(__name__)


def disk_full(exc: BaseException, path: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC, or torch's zip writer's failure ("file write failed",
    "unexpected pos", which carry no errno) on a device with under 1 MiB free."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    if isinstance(exc, RuntimeError) and any(s in str(exc) for s in ("write failed", "unexpected pos", "No space")):
        try:
            return shutil.disk_usage(path if path.exists() else path.parent).free < 2**20
        except OSError:
            return False
    return False

FAULT_KILL_ENV = "DISENT_FAULT_CHECKPOINT_KILL"  # test-only, see the package docstring


class CheckpointManager:
    """Saves, finds, loads and prunes checkpoints under run_dir/checkpoints."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        keep: int = 3,
        upload_url: str | None = None,
        uploader: Callable[[Path, str], None] | None = None,
    ):
        self.layout = RunLayout(Path(run_dir))
        self.run_dir = self.layout.run_dir
        self.root = self.layout.checkpoints
        self.keep = max(1, keep)
        self.uploads = CheckpointUploads(upload_url, uploader) if upload_url else None

    # ------------------------------------------------------------------ finding

    def checkpoints(self) -> list[CheckpointInfo]:
        return list_checkpoints(self.root)

    def latest_complete(self) -> CheckpointInfo | None:
        complete = [c for c in self.checkpoints() if c.complete]
        return complete[-1] if complete else None

    @staticmethod
    def resolve(path: str | os.PathLike) -> CheckpointInfo:
        """A checkpoint named by --resume: a step-* directory, or a run/checkpoints dir (its latest)."""
        path = Path(path)
        match = STEP_DIR.match(path.name)
        if match:
            if not path.is_dir():
                raise CheckpointError(f"checkpoint {path} does not exist")
            info = CheckpointInfo(path, int(match.group(1)))
            if not info.complete:
                raise CheckpointError(
                    f"checkpoint {path} is incomplete (no {COMPLETE} marker): it was interrupted while being "
                    "written; pick an earlier one"
                )
            return info
        for root in (RunLayout(path).checkpoints, path):
            complete = [c for c in list_checkpoints(root) if c.complete]
            if complete:
                return complete[-1]
        raise CheckpointError(f"no complete checkpoint under {path}")

    # ------------------------------------------------------------------ saving

    def save(self, step: int, parts: Mapping[str, Any], meta: dict, vae: torch.nn.Module) -> Path:
        """Every rank calls this with the same part names. `vae` is the bare VAE whose weights eval and
        swap read. Returns the checkpoint directory once it is COMPLETE."""
        rank, world = process_group.rank_and_world()
        path = self.layout.checkpoint(step)
        if rank == 0:
            if path.exists():  # leftovers of an interrupted save of this step, or an older run's
                shutil.rmtree(path)
            path.mkdir(parents=True)
        process_group.barrier()
        try:
            self._write_parts(path, step, parts, meta, vae, rank, world)
        except (OSError, RuntimeError) as exc:
            if not disk_full(exc, path):
                raise
            shutil.rmtree(path, ignore_errors=True)  # never left for a whole one, nor taking the space a retry needs
            raise RetryableFailure(f"no space left on the device of {path}: the checkpoint of step {step} was not "
                                   "written (its partial folder is removed); free space there, or set run_dir to "
                                   "another file system") from None
        process_group.barrier()  # every rank has written (and closed) its files
        if rank == 0:
            fsync_tree(path)
            atomic_write_bytes(path / COMPLETE, f"{step}\n".encode())
            self.prune()
            if self.uploads:
                self.uploads.start(path, self.run_dir.name)
        process_group.barrier()  # nobody moves on (or exits) before the marker exists
        log.info("checkpoint %s complete", path)
        return path

    def _write_parts(self, path: Path, step: int, parts: Mapping[str, Any], meta: dict, vae: torch.nn.Module,
                     rank: int, world: int) -> None:
        engines, others = _split_parts(parts)
        for name, engine in engines.items():
            engine.save_checkpoint(str(path), tag=name, client_state={}, save_latest=False)
        _fault_kill_point(self.root, rank, step)
        atomic_torch_save({name: part.state_dict() for name, part in others.items()}, path / trainer_file(rank))
        if rank == 0:
            atomic_torch_save(cpu_state(vae), path / VAE_WEIGHTS)
            meta = {**meta, "step": step, "world_size": world}
            atomic_write_bytes(path / META, json.dumps(meta, indent=2, sort_keys=True).encode())

    def export_final(self, models: Mapping[str, torch.nn.Module], config_yaml: str) -> list[Path]:
        """Rank 0, at the end of a finished run: run_dir/final/{name}.pt, each a bare state_dict, and
        the run's config.yaml beside them (so final/ is a folder `disent.load` reads)."""
        return export_models(self.layout.final, dict(models), config_yaml)

    def prune(self) -> list[Path]:
        """Keep the newest `keep` complete checkpoints; drop incomplete ones older than the newest."""
        all_ckpts = self.checkpoints()
        complete = [c for c in all_ckpts if c.complete]
        if not complete:
            return []
        newest = complete[-1].step
        doomed = [c.path for c in complete[: -self.keep]]
        doomed += [c.path for c in all_ckpts if not c.complete and c.step < newest]
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed old checkpoint %s", path)
        return doomed

    @property
    def upload_errors(self) -> list[str]:
        return self.uploads.errors if self.uploads else []

    def wait_for_uploads(self, timeout: float | None = None) -> bool:
        """Wait for the uploads under way, at most `timeout` seconds (None: no bound). False, with a warning, when
        one is still running: its copy has no COMPLETE marker, so it is never taken for a whole checkpoint."""
        if not self.uploads or self.uploads.wait(timeout):
            return True
        log.warning("a checkpoint upload to %s did not finish within %ss; going on without it: the checkpoint in "
                    "run_dir is complete, its copy is not", self.uploads.base_url, timeout)
        return False

    # ------------------------------------------------------------------ loading

    def load(self, info: CheckpointInfo, parts: Mapping[str, Any]) -> dict:
        """Load every part in place from a complete checkpoint; returns its meta.

        The checkpoint may have been written by another number of ranks (meta["world_size"]): ZeRO 0
        engines load their replicated state as it is; ZeRO 1/2 engines load from a universal
        checkpoint that rank 0 converts into run_dir/.universal first (disent/checkpoint/reshard.py).
        Each other part gets the state of rank r mod the old world size; a part whose state is per rank
        (the trainer's RNG) compares meta["world_size"] with the new one itself.
        """
        rank, world = process_group.rank_and_world()
        if not info.complete:
            raise CheckpointError(f"checkpoint {info.path} is incomplete")
        meta = info.meta()
        written_by = int(meta.get("world_size") or 0)
        if written_by < 1:
            raise CheckpointError(f"{info.path / META} names no world_size; it was not written by disent")
        engines, others = _split_parts(parts)
        universal = universal_copies(info, engines, self.layout.universal) if written_by != world else {}
        for name, engine in engines.items():
            load_engine(engine, name, info.path, universal.get(name))
        if universal:
            process_group.barrier()  # every rank has read the converted copies
            if rank == 0:
                shutil.rmtree(self.layout.universal, ignore_errors=True)
        states_file = info.path / trainer_file(rank % written_by)
        states = safe_torch_load(states_file, map_location="cpu")
        missing = sorted(set(others) - set(states))
        if missing:
            raise CheckpointError(
                f"{states_file} holds no state for {', '.join(missing)} (it has "
                f"{', '.join(sorted(states)) or 'nothing'}); it was written by another version of disent"
            )
        for name, part in others.items():
            part.load_state_dict(states[name])
        if written_by != world and rank == 0:
            log.warning("checkpoint %s was written by %d ranks; resharded onto %d (engines: %s)", info.path,
                        written_by, world, ", ".join(f"{n} {'universal' if n in universal else 'as saved'}"
                                                      for n in engines))
        return meta


def _split_parts(parts: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(DeepSpeed engines, parts with state_dict/load_state_dict), each in the given order."""
    engines = {name: part for name, part in parts.items()
               if hasattr(part, "save_checkpoint") and hasattr(part, "load_checkpoint")}
    return engines, {name: part for name, part in parts.items() if name not in engines}


def _fault_kill_point(root: Path, rank: int, step: int) -> None:
    """Test-only: SIGKILL this rank mid-save when DISENT_FAULT_CHECKPOINT_KILL names it (once per run_dir)."""
    spec = os.environ.get(FAULT_KILL_ENV)
    if not spec:
        return
    want_rank, _, want_step = spec.partition(":")
    if int(want_rank) != rank or (want_step and int(want_step) != step):
        return
    marker = root / f".fault-checkpoint-kill-rank{rank}-step{step}"
    if marker.exists():
        return
    marker.write_text("fired\n")
    log.error("%s=%s: rank %d kills itself while checkpoint step %d is being written", FAULT_KILL_ENV, spec, rank, step)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)
