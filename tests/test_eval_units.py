"""Evaluation pieces on synthetic codes and an untrained model: probes, MIG, grids."""
import numpy as np
import pytest
import torch
from PIL import Image

from disent.config import load_config
from disent.eval import grids
from disent.eval.evaluate import Split, evaluate, same_class_partners
from disent.eval.probes import chance_accuracy, classification_probe, mutual_information_gap, regression_probe
from disent.models import DisentVAE


def _codes(n, seed, informative):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    codes = rng.normal(size=(n, 6)).astype(np.float32)
    if informative:
        codes[:, 0] += 6 * labels
    return codes, labels


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_classification_probe_reads_informative_codes_and_not_noise(kind):
    train, ytrain = _codes(800, 0, True)
    test, ytest = _codes(400, 1, True)
    assert classification_probe(train, ytrain, test, ytest, 4, kind, epochs=20) > 0.9
    noise_train, ny_train = _codes(800, 2, False)
    noise_test, ny_test = _codes(400, 3, False)
    acc = classification_probe(noise_train, ny_train, noise_test, ny_test, 4, kind, epochs=20)
    assert acc < chance_accuracy(ny_test) + 0.1


def test_regression_probe_r2_and_mig():
    rng = np.random.default_rng(0)
    factors = rng.uniform(size=(1000, 2)).astype(np.float32)
    codes = np.concatenate([factors[:, :1] * 2 + 0.01 * rng.normal(size=(1000, 1)), rng.normal(size=(1000, 3))], 1)
    r2 = regression_probe(codes[:700], factors[:700], codes[700:], factors[700:], "linear", epochs=40)
    assert r2[0] > 0.95 and r2[1] < 0.1
    mig, best = mutual_information_gap(codes, factors)
    assert best[0] == 0 and 0 < mig < 1


def test_same_class_partners_are_same_class_and_different_index():
    labels = np.array([0, 0, 1, 1, 1, 2, 2])
    partner = same_class_partners(labels, 0)
    assert (labels[partner] == labels).all() and (partner != np.arange(7)).all()


def test_grids_have_borders_and_save_as_png(tmp_path):
    torch.manual_seed(0)
    vae = DisentVAE(3, 32, 4, 4, 8).eval()
    a, b = torch.rand(3, 3, 32, 32), torch.rand(5, 3, 32, 32)
    swap = grids.swap_grid(vae, a, b)
    assert swap.shape == (4 * 34 + 2, 6 * 34 + 2, 3)
    assert (swap[2:34, 2:34] == 255).all()  # blank corner
    path = grids.save_png(swap, tmp_path / "swap.png")
    assert Image.open(path).format == "PNG"
    assert grids.prior_samples_grid(vae, a, 4).shape[1] == 5 * 34 + 2
    assert grids.interpolation_grid(vae, a, b[:3], 6).shape[1] == 8 * 34 + 2


def test_evaluate_untrained_model_writes_json_and_grids(tmp_path):
    cfg = load_config("configs/sprites.yaml", ["eval.probe_epochs=2", "eval.grid_size=4", "model.base_channels=8"])
    rng = np.random.default_rng(0)

    def split(n):
        return Split(rng.integers(0, 255, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 5, n),
                     rng.uniform(size=(n, 2)).astype(np.float32), ["x", "y"])

    vae = DisentVAE(3, 32, cfg.model.s_dim, cfg.model.z_dim, 8)
    metrics = evaluate(vae, cfg, tmp_path, train=split(200), test=split(100))
    for key in ("chance", "class_from_s_linear", "class_from_z_mean_mlp", "class_from_z_sample_linear",
                "reconstruction_mse", "swap_mse", "factor_r2_x_from_z", "mig"):
        assert key in metrics
    assert (tmp_path / "eval.json").exists()
    assert all(Image.open(p).format == "PNG" for p in metrics["grids"].values())
