"""Atomic, multi-rank checkpoints with auto-resume, pruning and an optional copy to s3://.

This module is the only code that knows the on-disk layout. The trainer hands
:meth:`CheckpointManager.save` a dict of stateful parts (each DeepSpeed engine, the data loader,
the trainer's own step and RNG) and gets them back, loaded in place, from
:meth:`CheckpointManager.load`; evaluation, `disent swap`, the demo and the final-weights export
read and write through :class:`CheckpointInfo` and :meth:`CheckpointManager.export_final`.

Layout::

    run_dir/checkpoints/step-00000123/
        vae/                    a DeepSpeed engine part: its own checkpoint (every rank writes its share)
        disc/                   the other engine
        trainer-rank{r}.pt      per rank: {part name: state_dict()} of every other part (trainer, loader)
        meta.json               rank 0: step, MLflow run id, resolved config, world size
        vae_weights.pt          rank 0: the bare VAE's state_dict, for eval/swap (weights_only loading)
        eval/                   `disent eval` of this checkpoint: eval.json and its PNG grids
        COMPLETE                written last, by rank 0, after every rank has finished
    run_dir/final/{vae,disc}.pt the bare models' weights at the end of a finished run
    run_dir/.universal/         transient: ZeRO 1/2 engine states converted while resuming on another
                                number of ranks (needs run_dir on a filesystem every node sees)

A part is an engine when it has both of DeepSpeed's ``save_checkpoint`` and ``load_checkpoint``; any other part
needs ``state_dict()``/``load_state_dict()`` returning tensors and plain values. Adding a part to
the dict the trainer passes is all a new checkpoint field takes (checkpoints written before it are
refused, naming it, unless :func:`_upgrade_part_states` gives them a value).

A checkpoint counts only once COMPLETE exists, so a crash during a save leaves the previous one
in force. Our own files are written to a temporary name, fsynced and renamed.

Every file of a checkpoint, DeepSpeed's included, is unpickled with ``torch.load(weights_only=True)``
(DeepSpeed 0.19.8 itself unpickles without that restriction; its engines' loads are routed through
:func:`safe_torch_load` while we resume), so a tampered checkpoint cannot run code.

Test-only fault injection: ``DISENT_FAULT_CHECKPOINT_KILL=RANK:STEP`` makes that rank SIGKILL itself
while checkpoint STEP is being written (after its DeepSpeed files, before its trainer file and the
COMPLETE barrier), once per run_dir. It exists for tests/faults/ and does nothing when unset.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from disent.io.storage import write_bytes_atomic

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
META = "meta.json"
VAE_WEIGHTS = "vae_weights.pt"
EVAL_DIR = "eval"
UNIVERSAL_DIR = ".universal"  # under run_dir: ZeRO 1/2 engine states converted for another world size
FINAL_DIR = "final"
STEP_DIR = re.compile(r"^step-(\d{8,})$")
FAULT_KILL_ENV = "DISENT_FAULT_CHECKPOINT_KILL"  # test-only, see the module docstring


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (incomplete, missing, written by another world size)."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def trainer_file(rank: int) -> str:
    return f"trainer-rank{rank}.pt"


def _fsync_path(path: str | Path) -> None:
    """Flush a file, or a directory's entries, to disk; best effort (some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    write_bytes_atomic(str(path), data)


def atomic_torch_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(str(path), buffer.getvalue())


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int

    @property
    def complete(self) -> bool:
        return (self.path / COMPLETE).is_file()

    @property
    def eval_dir(self) -> Path:
        """Where `disent eval` of this checkpoint puts eval.json and its grids."""
        return self.path / EVAL_DIR

    def meta(self) -> dict:
        return json.loads((self.path / META).read_text())

    def read_vae_weights(self) -> dict[str, torch.Tensor]:
        """The bare VAE's state_dict (what eval and swap load), read with weights_only."""
        weights = self.path / VAE_WEIGHTS
        if not weights.is_file():
            raise CheckpointError(f"checkpoint {self.path} has no {VAE_WEIGHTS}; it was written by an older disent")
        return safe_torch_load(weights, map_location="cpu")


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


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _from_rank_zero(value: Any) -> Any:
    """Rank 0's value on every rank (a collective; also the barrier after rank 0's work)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _deepspeed_safe_globals() -> list:
    """The few plain classes DeepSpeed (ZeRO 1/2) pickles into its checkpoints besides tensors and
    builtins; allow-listed for weights_only loading. None of them runs code when unpickled."""
    found = []
    for module, names in (
        ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
        ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
        ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
    ):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:  # pragma: no cover - DeepSpeed moved things
            continue
        found += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return found


def safe_torch_load(path, map_location=None) -> Any:
    """torch.load with weights_only=True (plus DeepSpeed's plain classes). Raises CheckpointError."""
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # UnpicklingError and friends: never retried without weights_only
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path} cannot be loaded safely (torch.load with weights_only=True refused it: {first[:300]}); "
            "it was not written by disent or has been tampered with. Nothing in it was run"
        ) from None


@contextlib.contextmanager
def _weights_only_engine_loads(engine):
    """Route a DeepSpeed engine's checkpoint reads through safe_torch_load while inside the block."""
    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    if ckpt_engine is None or not hasattr(ckpt_engine, "load"):
        yield
        return
    had_own = "load" in vars(ckpt_engine)
    original = vars(ckpt_engine).get("load")

    def load(path, map_location=None):
        return safe_torch_load(path, map_location=map_location)

    ckpt_engine.load = load
    try:
        yield
    finally:
        if had_own:
            ckpt_engine.load = original
        else:
            del ckpt_engine.load


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


class CheckpointManager:
    """Saves, finds, loads and prunes checkpoints under run_dir/checkpoints."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        keep: int = 3,
        upload_url: str | None = None,
        uploader: Callable[[Path, str], None] | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.keep = max(1, keep)
        self.upload_url = upload_url.rstrip("/") if upload_url else None
        self._uploader = uploader
        self._upload_threads: list[threading.Thread] = []
        self.upload_errors: list[str] = []

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
        for root in (path / "checkpoints", path):
            complete = [c for c in list_checkpoints(root) if c.complete]
            if complete:
                return complete[-1]
        raise CheckpointError(f"no complete checkpoint under {path}")

    # ------------------------------------------------------------------ saving

    def save(self, step: int, parts: Mapping[str, Any], meta: dict, vae: torch.nn.Module) -> Path:
        """Every rank calls this with the same part names. `vae` is the bare VAE whose weights eval and
        swap read. Returns the checkpoint directory once it is COMPLETE."""
        rank, world = _rank_and_world()
        path = self.root / step_dir_name(step)
        if rank == 0:
            if path.exists():  # leftovers of an interrupted save of this step, or an older run's
                shutil.rmtree(path)
            path.mkdir(parents=True)
        _barrier()
        engines, others = _split_parts(parts)
        for name, engine in engines.items():
            engine.save_checkpoint(str(path), tag=name, client_state={}, save_latest=False)
        _fault_kill_point(self.root, rank, step)
        atomic_torch_save({name: part.state_dict() for name, part in others.items()}, path / trainer_file(rank))
        if rank == 0:
            atomic_torch_save(_cpu_state(vae), path / VAE_WEIGHTS)
            meta = {**meta, "step": step, "world_size": world}
            atomic_write_bytes(path / META, json.dumps(meta, indent=2, sort_keys=True).encode())
        _barrier()  # every rank has written (and closed) its files
        if rank == 0:
            _fsync_tree(path)
            atomic_write_bytes(path / COMPLETE, f"{step}\n".encode())
            self.prune()
            if self.upload_url:
                self._start_upload(path)
        _barrier()  # nobody moves on (or exits) before the marker exists
        log.info("checkpoint %s complete", path)
        return path

    @property
    def final_dir(self) -> Path:
        return self.run_dir / FINAL_DIR

    def export_final(self, models: Mapping[str, torch.nn.Module], config_yaml: str | None = None) -> list[Path]:
        """Rank 0, at the end of a finished run: run_dir/final/{name}.pt, each a bare state_dict, and
        the run's config.yaml beside them (so final/ is a folder `disent.load` reads)."""
        final = self.final_dir
        final.mkdir(parents=True, exist_ok=True)
        written = []
        for name, model in models.items():
            atomic_torch_save(_cpu_state(model), final / f"{name}.pt")
            written.append(final / f"{name}.pt")
        if config_yaml is not None:
            write_bytes_atomic(str(final / "config.yaml"), config_yaml.encode())
            written.append(final / "config.yaml")
        return written

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

    # ------------------------------------------------------------------ loading

    def load(self, info: CheckpointInfo, parts: Mapping[str, Any]) -> dict:
        """Load every part in place from a complete checkpoint; returns its meta.

        The checkpoint may have been written by another number of ranks (meta["world_size"]): ZeRO 0
        engines load their replicated state as it is; ZeRO 1/2 engines load from a universal
        checkpoint that rank 0 converts into run_dir/.universal first (DeepSpeed's ds_to_universal).
        Each other part gets the state of rank r mod the old world size; a part whose state is per rank
        (the trainer's RNG) compares meta["world_size"] with the new one itself.
        """
        rank, world = _rank_and_world()
        if not info.complete:
            raise CheckpointError(f"checkpoint {info.path} is incomplete")
        meta = info.meta()
        written_by = int(meta.get("world_size") or 0)
        if written_by < 1:
            raise CheckpointError(f"{info.path / META} names no world_size; it was not written by disent")
        engines, others = _split_parts(parts)
        universal = self._universal_copies(info, engines) if written_by != world else {}
        for name, engine in engines.items():
            _load_engine(engine, name, info.path, universal.get(name))
        if universal:
            _barrier()  # every rank has read the converted copies
            if rank == 0:
                shutil.rmtree(self.run_dir / UNIVERSAL_DIR, ignore_errors=True)
        states_file = info.path / trainer_file(rank % written_by)
        states = _upgrade_part_states(safe_torch_load(states_file, map_location="cpu"))
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

    def _universal_copies(self, info: CheckpointInfo, engines: Mapping[str, Any]) -> dict[str, Path]:
        """Rank 0 converts each ZeRO 1/2 engine's checkpoint to DeepSpeed's universal format (which any
        world size loads) under run_dir/.universal; every rank gets the paths once they exist."""
        partitioned = [name for name, engine in engines.items() if _zero_stage(engine) in (1, 2)]
        if not partitioned:
            return {}
        root = self.run_dir / UNIVERSAL_DIR / info.path.name
        failure = None
        if _rank_and_world()[0] == 0:
            shutil.rmtree(root, ignore_errors=True)  # never trust an earlier conversion
            try:
                for name in partitioned:
                    _convert_to_universal(info.path / name, root / name)
            except CheckpointError as exc:
                failure = str(exc)
            except Exception as exc:  # the converter's own errors: a checkpoint it cannot read
                failure = f"DeepSpeed's universal conversion of {info.path} failed: {type(exc).__name__}: {exc}"
        failure = _from_rank_zero(failure)  # every rank learns the outcome: none waits for a peer that gave up
        if failure:
            raise CheckpointError(failure)
        return {name: root / name for name in partitioned}

    # ------------------------------------------------------------------ s3

    def _start_upload(self, path: Path) -> None:
        url = f"{self.upload_url}/{self.run_dir.name}/checkpoints/{path.name}"
        thread = threading.Thread(target=self._upload, args=(path, url), name="ckpt-upload", daemon=True)
        thread.start()
        self._upload_threads.append(thread)

    def _upload(self, path: Path, url: str) -> None:
        upload = self._uploader or _upload_file
        try:
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != COMPLETE)
            for file in files:
                upload(file, f"{url}/{file.relative_to(path).as_posix()}")
            upload(path / COMPLETE, f"{url}/{COMPLETE}")  # last, as on disk
            log.info("uploaded checkpoint %s to %s", path.name, url)
        except Exception as exc:  # an upload failure must not stop training
            msg = f"upload of checkpoint {path} to {url} failed: {exc}"
            self.upload_errors.append(msg)
            log.warning(msg)

    def wait_for_uploads(self, timeout: float | None = None) -> None:
        for thread in self._upload_threads:
            thread.join(timeout)
        self._upload_threads = [t for t in self._upload_threads if t.is_alive()]


def _zero_stage(engine) -> int:
    stage = getattr(engine, "zero_optimization_stage", None)
    return int(stage()) if callable(stage) else 0


def _load_engine(engine, name: str, path: Path, universal: Path | None) -> None:
    """engine.load_checkpoint of step-N/name, or of its universal copy (DeepSpeed reads that mode from
    its config at load time, so it is switched on for this one call)."""
    load_dir, config = (universal.parent, engine._config) if universal is not None else (path, None)
    previous = getattr(config, "load_universal_checkpoint", False)
    if config is not None:
        config.load_universal_checkpoint = True
    try:
        with _weights_only_engine_loads(engine):
            loaded, _ = engine.load_checkpoint(str(load_dir), tag=name)
    finally:
        if config is not None:
            config.load_universal_checkpoint = previous
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load the {name} engine from {path}")
    if universal is not None:
        _load_buffers(engine, path / name)


def _load_buffers(engine, saved: Path) -> None:
    """A universal load restores parameters from the fp32 master copies and skips the module's state
    dict, so buffers (the class-moment critic's running means) come from the saved model states."""
    buffers = {name for name, _ in engine.module.named_buffers()}
    if not buffers:
        return
    found = sorted(saved.glob("mp_rank_*_model_states.pt"))
    if not found:
        raise CheckpointError(f"{saved} has no mp_rank_*_model_states.pt to restore the module's buffers from")
    module = safe_torch_load(found[0], map_location="cpu")["module"]
    missing = sorted(buffers - set(module))
    if missing:
        raise CheckpointError(f"{found[0]} holds no value for the buffers {', '.join(missing)}")
    engine.module.load_state_dict({name: module[name] for name in buffers}, strict=False)


def _convert_to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's ds_to_universal, on files checked first: it unpickles without weights_only."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    for file in sorted(source.rglob("*.pt")):
        safe_torch_load(file, map_location="cpu")  # raises CheckpointError on anything but plain data
    args = argparse.Namespace(input_folder=str(source), output_folder=str(target), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress prints; our log line says what happened
        ds_to_universal(args)
    log.info("converted %s to DeepSpeed's universal checkpoint format in %s", source, target)


def _split_parts(parts: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(DeepSpeed engines, parts with state_dict/load_state_dict), each in the given order."""
    engines = {name: part for name, part in parts.items()
               if hasattr(part, "save_checkpoint") and hasattr(part, "load_checkpoint")}
    return engines, {name: part for name, part in parts.items() if name not in engines}


def _upgrade_part_states(states: dict) -> dict:
    """Checkpoints written before the parts were named held the trainer's and the loader's state in
    one flat dict ({step, rng, loader_json}); read them as the two parts they are now."""
    if "loader_json" not in states:
        return states
    return {"trainer": {"step": states["step"], "rng": states["rng"]}, "loader": json.loads(states["loader_json"])}


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights on the CPU in float32: what fp16 training holds in half precision loads anywhere as the
    model's own dtype."""
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu() for k, v in model.state_dict().items()}


def _upload_file(local: Path, url: str) -> None:
    from disent.io.s3 import upload_file

    upload_file(str(local), url)
