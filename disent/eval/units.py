"""Where the class sits in z, unit by unit: each unit's KL to the prior, which units are active, and the
leakage yardstick on groups of units apart.

A unit is active when its mean moves with the image, Var_x(mu_d) > 0.01 (Burda et al., 2016): a unit the
decoder relies on has to move. A unit can move and still carry little: informative units are those whose KL
exceeds 0.5 nats, the rest are quiet. A quiet or inactive unit adds little to the image, but with a learned
log-variance it can still hold small class-dependent offsets in its mean that the decoder ignores and a
probe, which standardises each unit, reads as well as any other. Reading the groups apart says whether
the class in mu is content the decoder uses or residue it does not.
"""
from __future__ import annotations

import numpy as np

from disent.eval.leakage import class_leakage

ACTIVE_VARIANCE = 0.01
INFORMATIVE_KL = 0.5  # nats


def unit_kl(mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """Each unit's KL(q(z_d | x) || N(0, 1)) averaged over the codes, in nats ([z_dim])."""
    mu, logvar = mu.astype(np.float64), logvar.astype(np.float64)
    return (0.5 * (mu**2 + np.exp(logvar) - 1.0 - logvar)).mean(0)


def active_units(mu: np.ndarray) -> np.ndarray:
    """Boolean [z_dim]: the units whose mean varies over the codes by more than ACTIVE_VARIANCE."""
    return mu.astype(np.float64).var(0) > ACTIVE_VARIANCE


def class_by_units(train_codes: dict, train_labels: np.ndarray, test_codes: dict, test_labels: np.ndarray,
                   num_classes: int, max_epochs: int) -> dict:
    """Per-unit KL and variance (lists, for eval.json), the active and informative counts, the KL the active and
    inactive units hold, and the yardstick's accuracy and bits on each group of units: active and inactive,
    informative and quiet (a group with no unit, or all of them, is left out). Groups are chosen on the train
    codes."""
    mu, logvar = train_codes["mu"], train_codes["logvar"]
    kl, active = unit_kl(mu, logvar), active_units(mu)
    informative = kl > INFORMATIVE_KL
    out: dict = {
        "unit_kl": [round(float(v), 4) for v in kl],
        "unit_mu_variance": [round(float(v), 4) for v in mu.astype(np.float64).var(0)],
        "units_active": int(active.sum()),
        "units_informative": int(informative.sum()),
        "units_kl_active": float(kl[active].sum()),
        "units_kl_inactive": float(kl[~active].sum()),
    }
    groups = (("active", active), ("inactive", ~active), ("informative", informative), ("quiet", ~informative))
    for group, mask in groups:
        if not mask.any() or mask.all():  # the whole code: the leakage metric has it already
            continue
        found = class_leakage(train_codes["mu"][:, mask], train_labels, test_codes["mu"][:, mask], test_labels,
                              num_classes, max_epochs)
        out[f"leakage_mu_{group}_acc"] = found["acc"]
        out[f"leakage_mu_{group}_bits"] = found["bits"]
    return out
