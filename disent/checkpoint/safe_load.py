"""Loading checkpoint files without running code: every file, DeepSpeed's included, is unpickled with
``torch.load(weights_only=True)`` plus DeepSpeed's few plain classes. DeepSpeed 0.19.8 itself unpickles
without that restriction; its engines' loads are routed through :func:`safe_torch_load` while we resume,
so a tampered checkpoint cannot run code."""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from disent.checkpoint.errors import CheckpointError


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


def safe_torch_load(path, map_location=None, deepspeed_classes: bool = True) -> Any:
    """torch.load with weights_only=True (plus DeepSpeed's plain classes, unless a file of our own holds only tensors:
    then DeepSpeed is not imported at all, and evaluation starts without it). Raises CheckpointError."""
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals() if deepspeed_classes else []):
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
def weights_only_engine_loads(engine):
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
