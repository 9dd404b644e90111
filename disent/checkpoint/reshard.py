"""Loading a DeepSpeed engine's part of a checkpoint, on the number of ranks that wrote it or on another.

ZeRO 0 engines hold replicated state and load as saved on any number of ranks. ZeRO 1/2 partition the
optimizer state by rank: resuming on another number of ranks goes through DeepSpeed's universal
checkpoint format, which rank 0 converts into run_dir/.universal first. DeepSpeed 0.19.8 offers that
conversion only as its command-line `main` (hence the argparse namespace) and reads the universal mode
from the engine's config at load time (hence the switch around the one load call).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import shutil
from pathlib import Path
from typing import Any, Mapping

from disent import process_group
from disent.checkpoint.layout import CheckpointError, CheckpointInfo
from disent.checkpoint.safe_load import safe_torch_load, weights_only_engine_loads

log = logging.getLogger(__name__)


def zero_stage(engine) -> int:
    stage = getattr(engine, "zero_optimization_stage", None)
    return int(stage()) if callable(stage) else 0


def universal_copies(info: CheckpointInfo, engines: Mapping[str, Any], universal_root: Path) -> dict[str, Path]:
    """Rank 0 converts each ZeRO 1/2 engine's checkpoint to DeepSpeed's universal format (which any
    world size loads) under universal_root; every rank gets the paths once they exist."""
    partitioned = [name for name, engine in engines.items() if zero_stage(engine) in (1, 2)]
    if not partitioned:
        return {}
    root = universal_root / info.path.name
    failure = None
    if process_group.rank_and_world()[0] == 0:
        shutil.rmtree(root, ignore_errors=True)  # never trust an earlier conversion
        try:
            for name in partitioned:
                _convert_to_universal(info.path / name, root / name)
        except CheckpointError as exc:
            failure = str(exc)
        except Exception as exc:  # the converter's own errors: a checkpoint it cannot read
            failure = f"DeepSpeed's universal conversion of {info.path} failed: {type(exc).__name__}: {exc}"
    failure = process_group.from_rank_zero(failure)  # every rank learns the outcome: none waits for a peer that gave up
    if failure:
        raise CheckpointError(failure)
    return {name: root / name for name in partitioned}


def load_engine(engine, name: str, path: Path, universal: Path | None) -> None:
    """engine.load_checkpoint of step-N/name, or of its universal copy (DeepSpeed reads that mode from
    its config at load time, so it is switched on for this one call)."""
    load_dir, config = (universal.parent, engine._config) if universal is not None else (path, None)
    previous = getattr(config, "load_universal_checkpoint", False)
    if config is not None:
        config.load_universal_checkpoint = True
    try:
        with weights_only_engine_loads(engine):
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
    # lazy: importing DeepSpeed picks its accelerator, which train.distributed decides first (use_accelerator)
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    for file in sorted(source.rglob("*.pt")):
        safe_torch_load(file, map_location="cpu")  # raises CheckpointError on anything but plain data
    args = argparse.Namespace(input_folder=str(source), output_folder=str(target), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress prints; our log line says what happened
        ds_to_universal(args)
    log.info("converted %s to DeepSpeed's universal checkpoint format in %s", source, target)
