"""Disentanglement evaluation on the held-out split: probes, factor read-out, errors, grids."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from disent.config import Config
from disent.eval import grids
from disent.eval.probes import chance_accuracy, classification_probe, mutual_information_gap, regression_probe
from disent.models.vae import DisentVAE

log = logging.getLogger(__name__)


@dataclass
class Split:
    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 [N]
    factors: np.ndarray  # float32 [N, F]
    factor_names: list[str]


def load_split(cfg: Config, split: str, limit: int) -> Split:
    from disent.data.stream import load_split_arrays

    images, labels, factors, names = load_split_arrays(cfg.data, split, limit)
    return Split(images, labels.astype(np.int64), factors.astype(np.float32), list(names))


def _as_float(images: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(images).to(device).float().div_(255)


@torch.no_grad()
def encode_all(vae: DisentVAE, images: np.ndarray, device: torch.device, batch: int = 512, seed: int = 0) -> dict:
    """s, mu and one sampled z for every image (numpy, float32)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = {"s": [], "mu": [], "z": []}
    for start in range(0, len(images), batch):
        s, mu, logvar = vae.encode(_as_float(images[start : start + batch], device))
        eps = torch.randn(mu.shape, generator=generator).to(mu)
        out["s"].append(s.cpu())
        out["mu"].append(mu.cpu())
        out["z"].append((mu + eps * torch.exp(0.5 * logvar)).cpu())
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def same_class_partners(labels: np.ndarray, seed: int) -> np.ndarray:
    """For each index, another index of the same class (a random permutation within each class)."""
    rng = np.random.default_rng(seed)
    partner = np.arange(len(labels))
    for c in np.unique(labels):
        cycle = rng.permutation(np.flatnonzero(labels == c))
        partner[cycle] = np.roll(cycle, -1)  # each member points at the next one in a random cycle
    return partner


@torch.no_grad()
def reconstruction_errors(vae: DisentVAE, test: Split, codes: dict, device: torch.device, seed: int) -> dict:
    """Per-pixel MSE of Dec(mu, s) -> x and of the swap Dec(mu, s of a same-class partner) -> x."""
    partner = same_class_partners(test.labels, seed)
    recon, swap = 0.0, 0.0
    for start in range(0, len(test.images), 512):
        sl = slice(start, start + 512)
        x = _as_float(test.images[sl], device)
        mu = torch.from_numpy(codes["mu"][sl]).to(device)
        s = torch.from_numpy(codes["s"][sl]).to(device)
        s_partner = torch.from_numpy(codes["s"][partner[sl]]).to(device)
        recon += F.mse_loss(torch.sigmoid(vae.decode(mu, s)), x, reduction="sum").item()
        swap += F.mse_loss(torch.sigmoid(vae.decode(mu, s_partner)), x, reduction="sum").item()
    pixels = test.images.size
    return {"reconstruction_mse": recon / pixels, "swap_mse": swap / pixels}


def _grid_inputs(test: Split, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row images spread over classes, and a disjoint set of column images."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(test.labels))
    rows, seen = [], set()
    for i in order:  # one per class first, so the rows show different classes
        if test.labels[i] not in seen:
            rows.append(i)
            seen.add(test.labels[i])
        if len(rows) == count:
            break
    rows += [i for i in order if i not in rows][: count - len(rows)]
    cols = [i for i in order if i not in rows][:count]
    return np.array(rows), np.array(cols)


@torch.no_grad()
def save_grids(vae: DisentVAE, test: Split, out_dir: Path, count: int, device: torch.device, seed: int) -> dict:
    rows, cols = _grid_inputs(test, count, seed)
    a, b = _as_float(test.images[rows], device), _as_float(test.images[cols], device)
    return {
        "swap_grid": str(grids.save_png(grids.swap_grid(vae, a, b), out_dir / "swap_grid.png")),
        "prior_samples": str(grids.save_png(grids.prior_samples_grid(vae, a, count, seed), out_dir / "prior_samples.png")),
        "interpolation": str(grids.save_png(grids.interpolation_grid(vae, a, b, count), out_dir / "interpolation.png")),
    }


def evaluate(vae: DisentVAE, cfg: Config, out_dir: Path, device: torch.device | str = "cpu",
             train: Split | None = None, test: Split | None = None) -> dict:
    """All metrics (flat dict, JSON-able) plus the grid PNG paths under 'grids'; writes eval.json."""
    device = torch.device(device)
    was_training = vae.training
    vae.eval()
    try:
        train = train or load_split(cfg, cfg.data.train_split, cfg.eval.max_train_samples)
        test = test or load_split(cfg, cfg.data.eval_split, cfg.eval.max_test_samples)
        seed, epochs, classes = cfg.seed, cfg.eval.probe_epochs, cfg.data.num_classes
        train_codes = encode_all(vae, train.images, device, seed=seed)
        test_codes = encode_all(vae, test.images, device, seed=seed + 1)

        metrics: dict = {"chance": chance_accuracy(test.labels), "num_train": len(train.labels), "num_test": len(test.labels)}
        for code, name in (("s", "s"), ("mu", "z_mean"), ("z", "z_sample")):
            for kind in ("linear", "mlp"):
                metrics[f"class_from_{name}_{kind}"] = classification_probe(
                    train_codes[code], train.labels, test_codes[code], test.labels, classes, kind, epochs, seed)
        metrics.update(reconstruction_errors(vae, test, test_codes, device, seed))

        if test.factor_names:
            for code, name in (("s", "s"), ("mu", "z")):
                r2 = regression_probe(train_codes[code], train.factors, test_codes[code], test.factors, "mlp", epochs, seed)
                for factor, value in zip(test.factor_names, r2):
                    metrics[f"factor_r2_{factor}_from_{name}"] = float(value)
            all_codes = np.concatenate([test_codes["s"], test_codes["mu"]], axis=1)
            mig, best = mutual_information_gap(all_codes, test.factors)
            metrics["mig"] = mig
            s_dim = test_codes["s"].shape[1]
            for factor, dim in zip(test.factor_names, best):
                metrics[f"factor_top_code_{factor}"] = f"s[{dim}]" if dim < s_dim else f"z[{dim - s_dim}]"

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics["grids"] = save_grids(vae, test, out_dir, cfg.eval.grid_size, device, seed)
        (out_dir / "eval.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        return metrics
    finally:
        vae.train(was_training)


def numeric_metrics(metrics: dict, prefix: str = "eval/") -> dict[str, float]:
    """The float-valued metrics, prefixed, for MLflow."""
    return {f"{prefix}{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
