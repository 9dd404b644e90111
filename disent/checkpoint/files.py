"""Writing a checkpoint's files so that a crash never leaves a half-written one in force: a temporary
name, fsync, rename; and the weights as plain float32 CPU tensors."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from disent.io.storage import write_bytes_atomic


def atomic_write_bytes(path: Path, data: bytes) -> None:
    write_bytes_atomic(str(path), data)


def atomic_torch_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(str(path), buffer.getvalue())


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


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


def export_models(directory: Path, models: dict[str, torch.nn.Module], config_yaml: str) -> list[Path]:
    """An exported model folder (layout.EXPORTED_FILES and any other model): {name}.pt, each a bare float32
    state_dict, and the config.yaml they were trained with. `disent.load` reads it."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in models.items():
        atomic_torch_save(cpu_state(model), directory / f"{name}.pt")
        written.append(directory / f"{name}.pt")
    atomic_write_bytes(directory / "config.yaml", config_yaml.encode())
    return [*written, directory / "config.yaml"]


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights on the CPU in float32: what fp16 training holds in half precision loads anywhere as the
    model's own dtype."""
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu() for k, v in model.state_dict().items()}
