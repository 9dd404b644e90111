"""The Python API: a trained model, from a run, a checkpoint, an exported model or an MLflow model URI.

    import disent
    model = disent.load("runs/fashion_mnist")       # or runs/.../checkpoints/step-N, "runs:/<id>/model",
                                                    # "models:/<name>/latest", an exported model folder
    s, mu, logvar = model.encode(images)            # uint8 or float in [0, 1]; N x C x H x W or N x H x W x C
    pictures = model.swap(content, style)           # content's class in style's manner, floats in [0, 1]
    model.config.model.z_dim                        # the config it was trained with

Arrays in give arrays out: numpy in, numpy out; torch in, torch (on the CPU) out.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from disent.checkpoint import EXPORTED_FILES, CheckpointError, CheckpointManager, export_models, safe_torch_load
from disent.config import Config, ConfigError, from_dict, load_config, to_yaml
from disent.models.vae import float32_copy, vae_from_config

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


class Model:
    """A trained VAE in eval mode with the config it was trained with."""

    def __init__(self, vae: torch.nn.Module, config: Config, source: str, device: str | torch.device | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.vae = vae.eval().to(self.device)
        self.config = config
        self.source = source

    def __repr__(self) -> str:
        d, m = self.config.data, self.config.model
        return (f"disent.Model({self.source!r}: {d.channels}x{d.image_size}x{d.image_size} images, s_dim={m.s_dim}, "
                f"z_dim={m.z_dim}, on {self.device})")

    # ------------------------------------------------------------------ images in

    def as_batch(self, images: Any) -> torch.Tensor:
        """float [N, C, H, W] in [0, 1] on the model's device, from uint8 or float images in [0, 1], laid out
        N x C x H x W or N x H x W x C (or N x H x W for one channel), numpy or torch."""
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        c, size = self.config.data.channels, self.config.data.image_size
        if x.ndim == 3 and c == 1:
            x = x[:, None]
        if x.ndim != 4:
            raise ValueError(f"images must be N x C x H x W or N x H x W x C, got shape {tuple(x.shape)}")
        if x.shape[1] != c and x.shape[-1] == c:
            x = x.permute(0, 3, 1, 2)
        if tuple(x.shape[1:]) != (c, size, size):
            raise ValueError(f"images of shape {tuple(x.shape)} (as N x C x H x W) do not fit this model, which takes "
                             f"{c} x {size} x {size}; resize or convert them first")
        if x.dtype == torch.uint8:
            return x.to(self.device).float().div_(255)
        if not x.is_floating_point():
            raise ValueError(f"images must be uint8 (0-255) or floats in [0, 1], got {x.dtype}")
        if x.numel() and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
            raise ValueError(f"float images must lie in [0, 1], these span [{float(x.min()):.3g}, {float(x.max()):.3g}]; "
                             "divide 0-255 values by 255, or pass uint8")
        return x.to(self.device, torch.float32)

    @staticmethod
    def _like(value: torch.Tensor, example: Any) -> Any:
        value = value.detach().cpu()
        return value if isinstance(example, torch.Tensor) else value.numpy()

    # ------------------------------------------------------------------ the model

    @torch.no_grad()
    def encode(self, images: Any, batch_size: int = 1024) -> tuple[Any, Any, Any]:
        """(s, mu, logvar) for every image: s [N, s_dim], the specified code (the class); mu and logvar
        [N, z_dim], the unspecified code's posterior."""
        x = self.as_batch(images)
        parts = [self.vae.encode(x[i:i + batch_size]) for i in range(0, len(x), batch_size)] or [
            self.vae.encode(x[:0])]
        s, mu, logvar = (torch.cat([p[k] for p in parts]) for k in range(3))
        return self._like(s, images), self._like(mu, images), self._like(logvar, images)

    @torch.no_grad()
    def decode(self, z: Any, s: Any) -> Any:
        """Images (floats in [0, 1], N x C x H x W) drawn from unspecified codes z and specified codes s."""
        zt = torch.as_tensor(np.asarray(z) if not isinstance(z, torch.Tensor) else z).to(self.device, torch.float32)
        st = torch.as_tensor(np.asarray(s) if not isinstance(s, torch.Tensor) else s).to(self.device, torch.float32)
        if zt.ndim != 2 or st.ndim != 2 or len(zt) != len(st):
            raise ValueError(f"z and s must be [N, z_dim] and [N, s_dim] with the same N, got {tuple(zt.shape)} "
                             f"and {tuple(st.shape)}")
        return self._like(torch.sigmoid(self.vae.decode(zt, st)), z)

    @torch.no_grad()
    def swap(self, content: Any, style: Any) -> Any:
        """Single-image analogies: the class of each content image drawn in the manner of the style image
        at the same index (Dec(mu of style, s of content)); floats in [0, 1], N x C x H x W."""
        c, s = self.as_batch(content), self.as_batch(style)
        if len(c) != len(s):
            raise ValueError(f"content and style must hold as many images, got {len(c)} and {len(s)}")
        out = torch.sigmoid(self.vae.decode(self.vae.encode(s)[1], self.vae.encode(c)[0]))
        return self._like(out, content)

    def export(self, directory: str | Path) -> Path:
        """Write the weights and the config (EXPORTED_FILES) into directory; `disent.load` reads it back."""
        export_models(Path(directory), {"vae": self.vae}, to_yaml(self.config))
        return Path(directory)

    @classmethod
    def copy_of(cls, vae: torch.nn.Module, config: Config, source: str) -> "Model":
        """A CPU model holding a float32 copy of `vae`'s weights (a model in training is left as it is)."""
        return cls(float32_copy(vae, config, "cpu"), config, source, "cpu")


def _from_exported(directory: Path, source: str, device) -> Model:
    cfg = load_config(directory / "config.yaml")
    vae = vae_from_config(cfg)
    vae.load_state_dict(safe_torch_load(directory / "vae.pt", map_location="cpu"))
    return Model(vae, cfg, source, device)


def _find_exported(root: Path) -> Path | None:
    for candidate in (root, *sorted(p.parent for p in root.rglob("config.yaml"))):
        if all((candidate / name).is_file() for name in EXPORTED_FILES):
            return candidate
    return None


def load(source: str | Path, device: str | torch.device | None = None) -> Model:
    """A trained model from a run directory (its latest complete checkpoint), a checkpoints/step-N
    directory, an exported model folder (Model.export) or an MLflow model URI (runs:/RUN_ID/model,
    models:/NAME/VERSION or models:/NAME/latest; the tracking server from MLFLOW_TRACKING_URI)."""
    text = str(source)
    if text.startswith(MLFLOW_SCHEMES):
        import mlflow  # lazy: a local checkpoint or export loads without MLflow's second and a half

        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=tempfile.mkdtemp(prefix="disent-")))
        found = _find_exported(local)
        if found is None:
            raise ValueError(f"{text} holds no disent model ({' and '.join(EXPORTED_FILES)}); was it logged by disent?")
        return _from_exported(found, text, device)
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a run directory, a checkpoint directory, an exported "
                                "model folder or an MLflow model URI (runs:/..., models:/...)")
    if all((path / name).is_file() for name in EXPORTED_FILES):
        return _from_exported(path, text, device)
    _, cfg, vae = read_checkpoint(path)
    return Model(vae, cfg, text, device)


def read_checkpoint(path: str | Path, overrides: list[str] = ()):
    """(CheckpointInfo, the config it was trained with plus overrides, the VAE with its weights) from a
    run directory (its latest complete checkpoint) or one checkpoint directory."""
    try:
        info = CheckpointManager.resolve(path)
        cfg = from_dict(info.meta()["config"], list(overrides), origin=f"{info.path}/meta.json")
        weights = info.read_vae_weights()
    except CheckpointError as exc:
        raise ConfigError(f"{exc}; pass a run directory (run_dir) or a checkpoints/step-* directory") from None
    vae = vae_from_config(cfg)
    vae.load_state_dict(weights)
    return info, cfg, vae
