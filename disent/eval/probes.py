"""Probes on frozen codes: how much of a label (class or factor) can be read out of s or z.

A linear probe and a small MLP are both fitted on train-split codes and scored on the
test split. A disentangled model reads the class from s well and from z only at chance.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import mutual_info_score, r2_score
from sklearn.preprocessing import KBinsDiscretizer, StandardScaler


def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(0, keepdims=True), train.std(0, keepdims=True) + 1e-6
    return torch.from_numpy((train - mean) / std).float(), torch.from_numpy((test - mean) / std).float()


def _probe_net(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, out_dim))
    raise ValueError(f"unknown probe kind {kind!r}; use 'linear' or 'mlp'")


MIN_STEPS = 600  # a code set of a few thousand still gets a converged probe
MIN_EPOCHS = 100  # ... but never more passes than this over a small one (a smoke test's 90 codes took minutes)


def _fit(net: nn.Module, x: torch.Tensor, loss_fn, epochs: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    batch = 128
    per_epoch = -(-len(x) // batch)
    steps = max(epochs * per_epoch, min(MIN_STEPS, MIN_EPOCHS * per_epoch))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(net(x[idx]), idx).backward()
        optimizer.step()
        schedule.step()


def classification_probe(
    train_codes: np.ndarray, train_labels: np.ndarray, test_codes: np.ndarray, test_labels: np.ndarray,
    num_classes: int, kind: str, epochs: int = 30, seed: int = 0,
) -> float:
    """Test accuracy of a probe predicting labels from codes."""
    torch.manual_seed(seed)
    x_train, x_test = _standardize(train_codes, test_codes)
    y_train = torch.from_numpy(train_labels).long()
    net = _probe_net(kind, x_train.shape[1], num_classes)
    _fit(net, x_train, lambda out, idx: F.cross_entropy(out, y_train[idx]), epochs, seed)
    with torch.no_grad():
        predicted = net(x_test).argmax(1).numpy()
    return float((predicted == test_labels).mean())


def regression_probe(
    train_codes: np.ndarray, train_targets: np.ndarray, test_codes: np.ndarray, test_targets: np.ndarray,
    kind: str, epochs: int = 30, seed: int = 0,
) -> np.ndarray:
    """Per-target R^2 on the test split of a probe regressing targets [N, K] from codes."""
    torch.manual_seed(seed)
    x_train, x_test = _standardize(train_codes, test_codes)
    t_mean, t_std = train_targets.mean(0), train_targets.std(0) + 1e-6
    y_train = torch.from_numpy((train_targets - t_mean) / t_std).float()
    net = _probe_net(kind, x_train.shape[1], y_train.shape[1])
    _fit(net, x_train, lambda out, idx: F.mse_loss(out, y_train[idx]), epochs, seed)
    with torch.no_grad():
        predicted = net(x_test).numpy() * t_std + t_mean
    return np.atleast_1d(r2_score(test_targets, predicted, multioutput="raw_values"))


def chance_accuracy(test_labels: np.ndarray) -> float:
    """Accuracy of always answering the test split's most frequent class."""
    return float(np.bincount(test_labels).max() / len(test_labels))


def _discretize(values: np.ndarray, bins: int) -> np.ndarray:
    """Equal-frequency bins (scikit-learn's quantile binning)."""
    # numpy's linear quantiles: scikit-learn's default before 1.7, named since (its new default differs)
    linear = {"quantile_method": "linear"} if "quantile_method" in KBinsDiscretizer().get_params() else {}
    binner = KBinsDiscretizer(n_bins=bins, encode="ordinal", strategy="quantile", subsample=None, **linear)
    with warnings.catch_warnings():  # a code with fewer distinct values than bins gets fewer bins: as intended
        warnings.simplefilter("ignore", UserWarning)
        return binner.fit_transform(values.reshape(-1, 1).astype(np.float64)).ravel().astype(np.int64)


def _mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """The mutual information of two discrete variables, in nats."""
    return float(mutual_info_score(a, b))


def mutual_information_gap(codes: np.ndarray, factors: np.ndarray, bins: int = 20) -> tuple[float, list[int]]:
    """MIG (Chen et al., 2018): per factor, the gap between the two code dimensions that know most
    about it, over the factor's entropy; averaged over factors. Also returns, per factor, the
    code dimension that knows most."""
    codes_d = np.stack([_discretize(c, bins) for c in codes.T], axis=1)
    gaps, best = [], []
    for k in range(factors.shape[1]):
        factor = _discretize(factors[:, k], bins) if len(np.unique(factors[:, k])) > bins else np.unique(
            factors[:, k], return_inverse=True)[1]
        entropy = _mutual_information(factor, factor)
        mi = np.array([_mutual_information(codes_d[:, j], factor) for j in range(codes_d.shape[1])])
        top = np.argsort(mi)[::-1]
        gaps.append((mi[top[0]] - mi[top[1]]) / max(entropy, 1e-12))
        best.append(int(top[0]))
    return float(np.mean(gaps)), best


# --------------------------------------------------------------------------- published protocols


def jha_probe(train_codes: np.ndarray, train_labels: np.ndarray, test_codes: np.ndarray, test_labels: np.ndarray,
              num_classes: int, epochs: int = 30, seed: int = 0) -> tuple[float, float]:
    """(train, test) accuracy of Jha et al.'s classifier (ECCV 2018, the protocol behind the 66.8% of
    class left in z on MNIST): an MLP 256-256 with BatchNorm and LeakyReLU(0.2) on the codes."""
    torch.manual_seed(seed)
    x_train, x_test = _standardize(train_codes, test_codes)
    y_train = torch.from_numpy(train_labels).long()
    net = nn.Sequential(
        nn.Linear(x_train.shape[1], 256), nn.BatchNorm1d(256), nn.LeakyReLU(0.2),
        nn.Linear(256, 256), nn.BatchNorm1d(256), nn.LeakyReLU(0.2), nn.Linear(256, num_classes),
    )
    _fit(net, x_train, lambda out, idx: F.cross_entropy(out, y_train[idx]), epochs, seed)
    net.eval()
    with torch.no_grad():
        train_acc = float((net(x_train).argmax(1).numpy() == train_labels).mean())
        test_acc = float((net(x_test).argmax(1).numpy() == test_labels).mean())
    return train_acc, test_acc


def logistic_probe(train_codes: np.ndarray, train_labels: np.ndarray, test_codes: np.ndarray,
                   test_labels: np.ndarray) -> tuple[float, float]:
    """(train, test) accuracy of logistic regression on standardised codes (OverLORD's protocol for
    leakage into a deterministic code)."""
    scaler = StandardScaler().fit(train_codes)
    model = LogisticRegression(max_iter=2000).fit(scaler.transform(train_codes), train_labels)
    return (float(model.score(scaler.transform(train_codes), train_labels)),
            float(model.score(scaler.transform(test_codes), test_labels)))


def signal_to_noise(mu: np.ndarray, logvar: np.ndarray) -> float:
    """Mean over dimensions of std(mu) / mean(sigma): how far the posterior means spread next to the
    posterior noise. Near 0, a probe on sampled z sees mostly noise whatever the means hold."""
    sigma = np.exp(0.5 * logvar)
    return float(np.mean(mu.std(0) / (sigma.mean(0) + 1e-12)))


def gain_of_own_code(own_error: float, partner_error: float) -> float:
    """z_gain = 1 - error(own z) / error(a same-class partner's z): the share of the reconstruction
    error that only the image's own z removes (0: z carries nothing of the image)."""
    return float(1.0 - own_error / max(partner_error, 1e-12))


def dci(codes: np.ndarray, factors: np.ndarray, categorical: list[bool], seed: int = 0) -> dict[str, float]:
    """DCI disentanglement and completeness (Eastwood and Williams, 2018) from random-forest importances
    (one of the paper's two regressors; gradient-boosted trees, as in disentanglement_lib, grow a tree
    per class and took a minute for glyphs' 33 fonts): R[d, k] is how much code dimension d serves
    factor k; disentanglement is 1 - (entropy over factors) of each dimension, weighted by its share
    of R; completeness is 1 - (entropy over dimensions) for each factor, averaged."""
    num_codes, num_factors = codes.shape[1], factors.shape[1]
    importance = np.zeros((num_codes, num_factors))
    for k in range(num_factors):
        kind = RandomForestClassifier if categorical[k] else RandomForestRegressor
        target = factors[:, k].astype(np.int64) if categorical[k] else factors[:, k]
        model = kind(n_estimators=50, max_depth=8, random_state=seed).fit(codes, target)
        importance[:, k] = np.abs(model.feature_importances_)

    def one_minus_entropy(p: np.ndarray, base: int) -> np.ndarray:
        p = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12)
        logs = np.log(np.where(p > 0, p, 1.0)) / np.log(max(base, 2))
        return 1.0 + (p * logs).sum(axis=1)

    per_code = one_minus_entropy(importance, num_factors)
    weight = importance.sum(1) / max(importance.sum(), 1e-12)
    per_factor = one_minus_entropy(importance.T, num_codes)
    return {"dci_disentanglement": float((per_code * weight).sum()), "dci_completeness": float(per_factor.mean())}
