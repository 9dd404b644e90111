"""The fixed yardstick for class leakage: how much of the class a fresh probe fitted after training reads
from a code, in accuracy and in bits, beside what the same probe reads from shuffled labels.

The protocol (the same for every code, data set and run):
* an MLP of two hidden layers of 256 units with BatchNorm and ReLU;
* fitted on the train split's codes less a seeded validation cut (10%), with Adam, stopped early on the
  validation cross-entropy (the best epoch's weights are kept), at most `max_epochs` epochs;
* scored on the test split: accuracy, and leakage in bits = H(y) - the probe's test cross-entropy (in
  bits), where H(y) is the entropy of the train labels' frequencies (0 bits: the probe knows no more than
  the class frequencies; H(y): it reads the class perfectly);
* repeated over 3 seeds (mean and spread);
* chance measured: the same protocol on train labels shuffled among the train codes, one permutation per
  seed, averaged (what a probe makes of a code that holds nothing of the class, noise and finite samples
  included).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SEEDS = (0, 1, 2)
VALIDATION_SHARE = 0.1
PATIENCE = 5  # epochs without a better validation loss before stopping
BATCH = 256


def probe_mlp(in_dim: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, 256), nn.BatchNorm1d(256), nn.ReLU(),
                         nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, num_classes))


def entropy_bits(labels: np.ndarray, num_classes: int) -> float:
    p = np.bincount(labels, minlength=num_classes) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def _fit_early_stopped(x: torch.Tensor, y: torch.Tensor, num_classes: int, max_epochs: int, seed: int) -> nn.Module:
    """The probe fitted on x minus a validation cut, with the weights of its best validation epoch."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    cut = max(1, int(len(x) * VALIDATION_SHARE))
    val, fit = order[:cut], order[cut:]
    net = probe_mlp(x.shape[1], num_classes)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    best, best_state, waited = math.inf, None, 0
    for _ in range(max(1, max_epochs)):
        net.train()
        for idx in fit[torch.randperm(len(fit), generator=generator)].split(BATCH):
            if len(idx) < 2:  # BatchNorm needs two rows
                continue
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            optimizer.step()
        net.eval()
        with torch.no_grad():
            loss = float(F.cross_entropy(net(x[val]), y[val]))
        if loss < best:
            best, best_state, waited = loss, {k: v.clone() for k, v in net.state_dict().items()}, 0
        else:
            waited += 1
            if waited >= PATIENCE:
                break
    net.load_state_dict(best_state)
    return net.eval()


def probe_scores(train_codes: np.ndarray, train_labels: np.ndarray, test_codes: np.ndarray, test_labels: np.ndarray,
                 num_classes: int, max_epochs: int, seed: int) -> tuple[float, float]:
    """(test accuracy, leakage in bits) of one probe."""
    mean, std = train_codes.mean(0, keepdims=True), train_codes.std(0, keepdims=True) + 1e-6
    x = torch.from_numpy((train_codes - mean) / std).float()
    x_test = torch.from_numpy((test_codes - mean) / std).float()
    net = _fit_early_stopped(x, torch.from_numpy(train_labels).long(), num_classes, max_epochs, seed)
    with torch.no_grad():
        logits = net(x_test)
        y = torch.from_numpy(test_labels).long()
        accuracy = float((logits.argmax(1) == y).float().mean())
        cross_entropy_bits = float(F.cross_entropy(logits, y)) / math.log(2)
    return accuracy, entropy_bits(train_labels, num_classes) - cross_entropy_bits


def class_leakage(train_codes: np.ndarray, train_labels: np.ndarray, test_codes: np.ndarray, test_labels: np.ndarray,
                  num_classes: int, max_epochs: int = 30, seeds: tuple[int, ...] = SEEDS) -> dict[str, float]:
    """The protocol above: accuracy and bits (mean, spread over seeds), and the same with shuffled labels."""
    real = np.array([probe_scores(train_codes, train_labels, test_codes, test_labels, num_classes, max_epochs, s)
                     for s in seeds])
    # One permutation per seed: on a code that clusters by class, one permutation maps whole clusters to one
    # random class each, so a single draw of chance can land far from it.
    shuffled = np.array([probe_scores(train_codes, np.random.default_rng(s).permutation(train_labels), test_codes,
                                      test_labels, num_classes, max_epochs, s) for s in seeds])
    return {"acc": float(real[:, 0].mean()), "acc_std": float(real[:, 0].std()),
            "bits": float(real[:, 1].mean()), "bits_std": float(real[:, 1].std()),
            "shuffled_acc": float(shuffled[:, 0].mean()), "shuffled_bits": float(shuffled[:, 1].mean()),
            "entropy_bits": entropy_bits(train_labels, num_classes)}
