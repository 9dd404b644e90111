"""The MLflow model a finished run logs: a pyfunc around :class:`disent.api.Model`.

``mlflow.pyfunc.load_model("runs:/RUN_ID/model")`` (or ``models:/NAME/latest`` once registered) gives
a model whose ``predict(images)`` takes a batch of images, uint8 or floats in [0, 1], laid out
N x C x H x W or N x H x W x C, and returns ``{"s", "mu", "logvar"}`` (numpy float32): the same codes
as ``disent eval`` and ``disent.load(...).encode`` for the same images. With ``params={"mode": "swap"}``
the batch is 2N images, N content images then N style images, and it returns ``{"images"}``: the
content's class drawn in the style's manner (floats in [0, 1], N x C x H x W).

The logged folder holds the weights and config (``disent_model/``), the disent package itself (code,
so the model loads where disent is not installed; torch, numpy, PyYAML and Pillow are the
requirements, torch pinned to the release that trained it, its full build in the MLmodel's metadata
``torch_version``), an input example and a signature. The signature declares the outputs and the
``mode`` parameter; it leaves the input open because an MLflow tensor schema admits one dtype and
the model takes uint8 and float images (it checks their shape and range itself, naming the fault).
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec
from packaging.version import Version

from disent.api import load

log = logging.getLogger(__name__)

ARTIFACT = "disent_model"
ENTRY = Path(__file__).with_name("pyfunc_entry.py")  # MLflow's "models from code": no pickled object


class DisentPyfunc(PythonModel):
    def load_context(self, context) -> None:
        self.model = load(context.artifacts[ARTIFACT], device="cpu")

    def predict(self, context, model_input, params=None):
        mode = (params or {}).get("mode", "codes")
        images = np.asarray(model_input)
        if mode == "codes":
            s, mu, logvar = self.model.encode(images)
            return {"s": s, "mu": mu, "logvar": logvar}
        if mode == "swap":
            if len(images) % 2:
                raise ValueError(f"mode=swap takes 2N images (N content, then N style), got {len(images)}")
            half = len(images) // 2
            return {"images": self.model.swap(images[:half], images[half:])}
        raise ValueError(f"params mode={mode!r}: use 'codes' (the default) or 'swap'")


def _package_copy(into: Path) -> Path:
    """The disent package without caches, to ship as the model's code."""
    source = Path(__file__).resolve().parents[1]
    target = into / "disent"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def torch_requirement(version: str | None = None) -> str:
    """The pip requirement on the torch that trains (version: torch.__version__), e.g. torch==2.5.1 for 2.5.1+cu121:
    pip resolves no local build (+cpu, +cu121) from PyPI, and the same release loads the weights on CPU or GPU."""
    if version is None:
        version = str(torch.__version__)
    return f"torch=={Version(version).public}"


def save_pyfunc(model, directory: Path) -> Path:
    """Write the MLflow model of `model` (a disent.api.Model) into directory (which must not exist)."""
    m, d = model.config.model, model.config.data
    signature = ModelSignature(
        inputs=None,
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, m.s_dim), "s"),
                        TensorSpec(np.dtype(np.float32), (-1, m.z_dim), "mu"),
                        TensorSpec(np.dtype(np.float32), (-1, m.z_dim), "logvar")]),
        params=ParamSchema([ParamSpec("mode", "string", "codes")]),
    )
    ramp = np.linspace(0, 255, d.image_size * d.image_size, dtype=np.float32).reshape(d.image_size, d.image_size)
    example = np.stack([np.broadcast_to(ramp, (d.channels, d.image_size, d.image_size)),
                        np.broadcast_to(ramp.T, (d.channels, d.image_size, d.image_size))]).astype(np.uint8)
    with tempfile.TemporaryDirectory(prefix="disent-model-") as tmp:
        exported = model.export(Path(tmp) / ARTIFACT)
        mlflow.pyfunc.save_model(
            path=str(directory), python_model=str(ENTRY), artifacts={ARTIFACT: str(exported)},
            code_paths=[str(_package_copy(Path(tmp)))], signature=signature, input_example=example,
            pip_requirements=[torch_requirement(), "numpy", "pyyaml", "pillow", f"mlflow=={mlflow.__version__}"],
            metadata={"torch_version": str(torch.__version__)},  # a TorchVersion, which YAML cannot write
        )
    return directory


def log_trained_model(tracker, build: Callable[[], Any], target: Path, register_as: str | None) -> None:
    """The run's MLflow model of `build()` (a disent.api.Model) into `target` and the run's artifact "model",
    registered as `register_as` when given. A model that cannot be written is a warning: the run itself is
    complete and its final weights are saved."""
    shutil.rmtree(target, ignore_errors=True)
    try:
        save_pyfunc(build(), target)
    except Exception as exc:  # noqa: BLE001
        log.warning("the run's MLflow model was not written (%s: %s); run_dir/final/vae.pt has the weights",
                    type(exc).__name__, exc)
        return
    tracker.log_artifact(target, "model")
    if register_as:
        tracker.register_model(register_as, "model")
