"""Disentanglement evaluation on the held-out split: probes, factor read-out, errors, grids.

Each metric is a function registered with `@register_metric` (see disent/eval/metrics.py);
evaluate() encodes both splits once and runs them all in the order they are defined here.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from disent.config import Config
from disent.data.reading import load_split_arrays, open_split
from disent.eval import grids
from disent.eval.leakage import class_leakage
from disent.eval.metrics import EvalContext, register_metric, run_metrics
from disent.eval.probes import (
    chance_accuracy,
    classification_probe,
    dci,
    gain_of_own_code,
    jha_probe,
    logistic_probe,
    mutual_information_gap,
    regression_probe,
    signal_to_noise,
)
from disent.eval.units import class_by_units
from disent.models.vae import DisentVAE, float32_copy

log = logging.getLogger(__name__)


@dataclass
class Split:
    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 [N]
    factors: np.ndarray  # float32 [N, F]
    factor_names: list[str]
    categorical: list[str] = dataclasses.field(default_factory=list)  # factors that are categories (glyphs' font)


def load_split(cfg: Config, split: str, limit: int) -> Split:
    manifest = open_split(cfg.data, split)
    images, labels, factors, names = load_split_arrays(cfg.data, split, limit, manifest)
    categorical = list(manifest.source.get("categorical_factors", []))
    return Split(images, labels.astype(np.int64), factors.astype(np.float32), list(names), categorical)


def _as_float(images: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(images).to(device).float().div_(255)


def encode_all(vae: DisentVAE, images: np.ndarray, device: torch.device, batch: int = 512, seed: int = 0) -> dict:
    """s, mu, logvar and one sampled z for every image (numpy, float32)."""
    return {k: v.numpy() for k, v in encode_to_cpu(vae, images, device, batch, seed).items()}


@torch.no_grad()
def encode_to_cpu(vae: DisentVAE, images: np.ndarray, device: torch.device, batch: int = 512,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """encode_all's codes as float32 CPU tensors. The noise of z is drawn on the CPU, so it is the same on any
    device."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = {"s": [], "mu": [], "logvar": [], "z": []}
    for start in range(0, len(images), batch):
        s, mu, logvar = vae.encode(_as_float(images[start : start + batch], device))
        eps = torch.randn(mu.shape, generator=generator).to(mu)
        out["s"].append(s.cpu())
        out["mu"].append(mu.cpu())
        out["logvar"].append(logvar.cpu())
        out["z"].append((mu + eps * torch.exp(0.5 * logvar)).cpu())
    return {k: torch.cat(v).float() for k, v in out.items()}


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
    """Per-pixel MSE against x of Dec(mu, s) (reconstruction), Dec(mu, s of a same-class partner)
    (swap) and Dec(mu of that partner, s) (the partner's z), and z_gain from the first and last."""
    partner = same_class_partners(test.labels, seed)
    recon, swap, partner_z = 0.0, 0.0, 0.0
    for start in range(0, len(test.images), 512):
        sl = slice(start, start + 512)
        x = _as_float(test.images[sl], device)
        mu = torch.from_numpy(codes["mu"][sl]).to(device)
        s = torch.from_numpy(codes["s"][sl]).to(device)
        s_partner = torch.from_numpy(codes["s"][partner[sl]]).to(device)
        mu_partner = torch.from_numpy(codes["mu"][partner[sl]]).to(device)
        recon += F.mse_loss(torch.sigmoid(vae.decode(mu, s)), x, reduction="sum").item()
        swap += F.mse_loss(torch.sigmoid(vae.decode(mu, s_partner)), x, reduction="sum").item()
        partner_z += F.mse_loss(torch.sigmoid(vae.decode(mu_partner, s)), x, reduction="sum").item()
    pixels = test.images.size
    return {"reconstruction_mse": recon / pixels, "swap_mse": swap / pixels, "partner_z_mse": partner_z / pixels,
            "z_gain": gain_of_own_code(recon, partner_z)}


def _grid_inputs(test: Split, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row images spread over classes, and a disjoint set of column images: `count` of each, or half the split each
    when it holds fewer than two grids' worth."""
    if len(test.labels) < 2:
        raise ValueError(f"the test split holds {len(test.labels)} image(s); a grid needs at least 2")
    count = min(count, len(test.labels) // 2)
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


def factor_matrix(train: Split, test: Split, train_codes: dict, test_codes: dict, epochs: int, seed: int) -> dict:
    """Each known factor read from s and from the mean of z: R^2 for a continuous factor
    (factor_r2_<f>_from_{s,z}), accuracy beside chance for a categorical one (factor_acc_..., factor_chance_<f>)."""
    out: dict = {}
    continuous = [k for k, f in enumerate(test.factor_names) if f not in test.categorical]
    for code, name in (("s", "s"), ("mu", "z")):
        if not train_codes[code].shape[1]:  # a plain VAE's empty s
            continue
        if continuous:
            r2 = regression_probe(train_codes[code], train.factors[:, continuous], test_codes[code],
                                  test.factors[:, continuous], "mlp", epochs, seed)
            for k, value in zip(continuous, r2):
                out[f"factor_r2_{test.factor_names[k]}_from_{name}"] = float(value)
        for k, factor in enumerate(test.factor_names):
            if factor in test.categorical:
                y_train, y_test = train.factors[:, k].astype(np.int64), test.factors[:, k].astype(np.int64)
                count = int(max(y_train.max(), y_test.max())) + 1
                out[f"factor_acc_{factor}_from_{name}"] = classification_probe(
                    train_codes[code], y_train, test_codes[code], y_test, count, "mlp", epochs, seed)
                out[f"factor_chance_{factor}"] = chance_accuracy(y_test)
    return out


# --------------------------------------------------------------------------- the metrics, in the order they run


@register_metric("class_probes", headline=("class_from_s_mlp", "class_from_z_mean_mlp", "class_from_z_sample_mlp", "chance"))
def class_probes(ctx: EvalContext) -> dict:
    """The class read from s, the mean of z and a sampled z, by a linear and an MLP probe."""
    train, test = ctx.train, ctx.test
    out: dict = {"chance": chance_accuracy(test.labels), "num_train": len(train.labels), "num_test": len(test.labels)}
    for code, name in (("s", "s"), ("mu", "z_mean"), ("z", "z_sample")):
        if not ctx.train_codes[code].shape[1]:  # a plain VAE's empty s
            continue
        for kind in ("linear", "mlp"):
            out[f"class_from_{name}_{kind}"] = classification_probe(
                ctx.train_codes[code], train.labels, ctx.test_codes[code], test.labels, ctx.classes, kind, ctx.epochs, ctx.seed)
    return out


@register_metric("leakage", headline=("leakage_mu_bits",))
def leakage(ctx: EvalContext) -> dict:
    """The fixed yardstick (disent/eval/leakage.py) on s and on the mean of z: MLP accuracy and bits over 3 seeds,
    beside the same probe on shuffled labels."""
    out: dict = {}
    for code in ("s", "mu"):
        if not ctx.train_codes[code].shape[1]:  # a plain VAE's empty s
            continue
        found = class_leakage(ctx.train_codes[code], ctx.train.labels, ctx.test_codes[code], ctx.test.labels,
                              ctx.classes, ctx.epochs)
        out["class_entropy_bits"] = found.pop("entropy_bits")
        out.update({f"leakage_{code}_{k}": v for k, v in found.items()})
    if ctx.test.factor_names:  # the floor: what the true style factors themselves say of the class
        train_f, test_f = factor_features(ctx.train, ctx.test)
        found = class_leakage(train_f, ctx.train.labels, test_f, ctx.test.labels, ctx.classes, ctx.epochs)
        found.pop("entropy_bits")
        out.update({f"leakage_factors_{k}": v for k, v in found.items()})
    return out


@register_metric("units", headline=("units_active",))
def units(ctx: EvalContext) -> dict:
    """Where the class sits in z (disent/eval/units.py): per-unit KL, the active and informative units, and the
    yardstick on each group of units of the mean of z apart."""
    return class_by_units(ctx.train_codes, ctx.train.labels, ctx.test_codes, ctx.test.labels, ctx.classes, ctx.epochs)


def factor_features(train: Split, test: Split) -> tuple[np.ndarray, np.ndarray]:
    """The known factors as probe inputs: a categorical one (glyphs' font) one-hot, a continuous one as it is."""
    def features(split: Split, counts: dict[int, int]) -> np.ndarray:
        columns = [np.eye(counts[k], dtype=np.float32)[split.factors[:, k].astype(np.int64)] if k in counts
                   else split.factors[:, k:k + 1] for k in range(len(split.factor_names))]
        return np.concatenate(columns, axis=1)

    counts = {k: int(max(train.factors[:, k].max(), test.factors[:, k].max())) + 1
              for k, f in enumerate(test.factor_names) if f in test.categorical}
    return features(train, counts), features(test, counts)


@register_metric("reconstruction", headline=("z_gain",))
def reconstruction(ctx: EvalContext) -> dict:
    return reconstruction_errors(ctx.vae, ctx.test, ctx.test_codes, ctx.device, ctx.seed)


@register_metric("z_snr", headline=("z_snr",))
def z_snr(ctx: EvalContext) -> dict:
    return {"z_snr": signal_to_noise(ctx.test_codes["mu"], ctx.test_codes["logvar"])}


@register_metric("published_probes")
def published_probes(ctx: EvalContext) -> dict:
    """The published protocols, beside ours: Jha et al.'s MLP on sampled z, OverLORD's logistic
    regression on the (standardised) mean of z; accuracy on train and on test."""
    train, test, train_codes, test_codes = ctx.train, ctx.test, ctx.train_codes, ctx.test_codes
    out: dict = {}
    out["jha_class_from_z_sample_train"], out["jha_class_from_z_sample"] = jha_probe(
        train_codes["z"], train.labels, test_codes["z"], test.labels, ctx.classes, ctx.epochs, ctx.seed)
    out["logreg_class_from_z_mean_train"], out["logreg_class_from_z_mean"] = logistic_probe(
        train_codes["mu"], train.labels, test_codes["mu"], test.labels)
    return out


@register_metric("factors")
def factors(ctx: EvalContext) -> dict:
    """With known factors: each read from s and z, MIG, DCI, and the code dimension that best tells each."""
    test, test_codes = ctx.test, ctx.test_codes
    if not test.factor_names:
        return {}
    out = factor_matrix(ctx.train, test, ctx.train_codes, test_codes, ctx.epochs, ctx.seed)
    all_codes = np.concatenate([test_codes["s"], test_codes["mu"]], axis=1)
    out["mig"], best = mutual_information_gap(all_codes, test.factors)
    out.update(dci(all_codes, test.factors, [f in test.categorical for f in test.factor_names], ctx.seed))
    s_dim = test_codes["s"].shape[1]
    for factor, dim in zip(test.factor_names, best):
        out[f"factor_top_code_{factor}"] = f"s[{dim}]" if dim < s_dim else f"z[{dim - s_dim}]"
    return out


@register_metric("grids")
def grid_images(ctx: EvalContext) -> dict:
    return {"grids": save_grids(ctx.vae, ctx.test, ctx.out_dir, ctx.cfg.eval.grid_size, ctx.device, ctx.seed)}


# --------------------------------------------------------------------------- running them


def for_evaluation(vae: DisentVAE, cfg: Config) -> DisentVAE:
    """The model itself when its weights are float32 and it is not compiled; otherwise an uncompiled float32 copy on
    the same device. fp16 training keeps the weights in half: evaluation reads images and codes in one precision
    whatever the training's. A compiled model would compile new graphs for evaluation's batches, dtypes and layout
    on every rank 0 start: the copy runs eagerly."""
    if not cfg.train.compile and all(p.dtype == torch.float32 for p in vae.parameters()):
        return vae
    return float32_copy(vae, cfg, next(vae.parameters()).device)


def evaluate(vae: DisentVAE, cfg: Config, out_dir: Path, device: torch.device | str = "cpu",
             train: Split | None = None, test: Split | None = None) -> dict:
    """Every registered metric (flat dict, JSON-able; the grid PNG paths under 'grids'); writes eval.json."""
    device = torch.device(device)
    vae = for_evaluation(vae, cfg)
    was_training = vae.training
    vae.eval()
    try:
        train = train or load_split(cfg, cfg.data.train_split, cfg.eval.max_train_samples)
        test = test or load_split(cfg, cfg.data.eval_split, cfg.eval.max_test_samples)
        train_codes = encode_all(vae, train.images, device, seed=cfg.seed)
        test_codes = encode_all(vae, test.images, device, seed=cfg.seed + 1)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics = run_metrics(EvalContext(vae, cfg, train, test, train_codes, test_codes, device, out_dir))
        (out_dir / "eval.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        return metrics
    finally:
        vae.train(was_training)


def numeric_metrics(metrics: dict, prefix: str = "eval/") -> dict[str, float]:
    """The float-valued metrics, prefixed, for MLflow."""
    return {f"{prefix}{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
