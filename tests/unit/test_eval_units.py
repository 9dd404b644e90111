"""Evaluation pieces on synthetic codes and an untrained model: probes, MIG, grids."""
import numpy as np
import pytest
import torch
from PIL import Image

from disent.config import load_config
from disent.eval import grids
from disent.eval.evaluate import Split, evaluate, same_class_partners
from disent.eval.probes import chance_accuracy, classification_probe, mutual_information_gap, regression_probe
from disent.models.vae import DisentVAE


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


# --------------------------------------------------------------------------- metrics that noise cannot meet


class _Decoder:
    """A stand-in model whose decode either ignores z (it draws the class prototype from s) or draws
    the image from z alone (z holds the image's own logits)."""

    def __init__(self, uses_z: bool, prototypes: torch.Tensor):
        self.uses_z, self.prototypes = uses_z, prototypes

    def decode(self, z, s):
        if self.uses_z:
            return z.view(-1, 1, 4, 4)
        return self.prototypes[s[:, 0].long()]


def _split_with_style(n=200, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    images = rng.integers(0, 255, (n, 1, 4, 4), dtype=np.uint8)
    return Split(images, labels, np.zeros((n, 0), np.float32), [])


def test_z_gain_is_zero_when_z_carries_nothing_and_near_one_when_it_carries_the_image():
    from disent.eval.evaluate import reconstruction_errors

    test = _split_with_style()
    x = torch.from_numpy(test.images).float() / 255
    logits = torch.logit(x.clamp(0.01, 0.99)).reshape(len(x), -1).numpy()
    codes = {"s": np.repeat(test.labels[:, None].astype(np.float32), 2, 1), "mu": logits}
    prototypes = torch.zeros(3, 1, 4, 4)
    ignoring = reconstruction_errors(_Decoder(False, prototypes), test, codes, torch.device("cpu"), 0)
    assert ignoring["z_gain"] == pytest.approx(0.0, abs=1e-9)  # own z and a partner's z decode the same
    using = reconstruction_errors(_Decoder(True, prototypes), test, codes, torch.device("cpu"), 0)
    assert using["z_gain"] > 0.95


def test_signal_to_noise_tells_spread_means_from_posterior_noise():
    from disent.eval.probes import signal_to_noise

    rng = np.random.default_rng(0)
    assert signal_to_noise(np.zeros((500, 4)), np.zeros((500, 4))) == 0.0  # every mean the same
    spread = rng.normal(scale=2.0, size=(5000, 4))
    assert signal_to_noise(spread, np.zeros((5000, 4))) == pytest.approx(2.0, rel=0.05)  # sigma 1
    assert signal_to_noise(spread, np.full((5000, 4), np.log(16.0))) == pytest.approx(0.5, rel=0.05)  # sigma 4


def test_published_probes_find_the_class_in_a_leaky_code_and_not_in_noise():
    from disent.eval.probes import jha_probe, logistic_probe

    leaky, y = _codes(800, 0, True)
    leaky_test, y_test = _codes(400, 1, True)
    noise, ny = _codes(800, 2, False)
    noise_test, ny_test = _codes(400, 3, False)
    chance = chance_accuracy(ny_test)
    for probe in (lambda *a: jha_probe(*a, 4, epochs=10), logistic_probe):
        train_acc, test_acc = probe(leaky, y, leaky_test, y_test)
        assert train_acc > 0.9 and test_acc > 0.9
        _, noise_acc = probe(noise, ny, noise_test, ny_test)
        assert noise_acc < chance + 0.1


def test_dci_is_high_for_one_dimension_per_factor_and_low_for_mixed_codes():
    from disent.eval.probes import dci

    rng = np.random.default_rng(0)
    factors = np.stack([rng.uniform(size=1000), rng.integers(0, 5, 1000)], 1).astype(np.float32)
    aligned = np.concatenate([factors, rng.normal(size=(1000, 2))], 1)
    good = dci(aligned, factors, [False, True])
    assert good["dci_disentanglement"] > 0.8 and good["dci_completeness"] > 0.8
    # one dimension holds both factors (the category as the integer part, the other as the fraction)
    entangled = np.concatenate([factors[:, :1] + factors[:, 1:], rng.normal(size=(1000, 3))], 1)
    bad = dci(entangled, factors, [False, True])
    assert bad["dci_disentanglement"] < 0.5
    # one factor spread over two dimensions
    spread = np.concatenate([factors[:, :1] * 0.5 + rng.normal(size=(1000, 1)) * 0.2,
                             factors[:, :1] * 0.5 - rng.normal(size=(1000, 1)) * 0.2, factors[:, 1:]], 1)
    assert dci(spread, factors, [False, True])["dci_completeness"] < good["dci_completeness"] - 0.2


def test_evaluate_reports_the_strict_metrics_and_a_categorical_factor(tmp_path):
    cfg = load_config("configs/sprites.yaml", ["eval.probe_epochs=2", "eval.grid_size=4", "model.base_channels=8"])
    rng = np.random.default_rng(0)

    def split(n):
        factors = np.stack([rng.integers(0, 3, n), rng.uniform(size=n)], 1).astype(np.float32)
        return Split(rng.integers(0, 255, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 5, n), factors,
                     ["font", "size"], ["font"])

    vae = DisentVAE(3, 32, cfg.model.s_dim, cfg.model.z_dim, 8)
    metrics = evaluate(vae, cfg, tmp_path, train=split(200), test=split(100))
    for key in ("z_gain", "z_snr", "partner_z_mse", "jha_class_from_z_sample", "jha_class_from_z_sample_train",
                "logreg_class_from_z_mean", "logreg_class_from_z_mean_train", "factor_acc_font_from_s",
                "factor_acc_font_from_z", "factor_chance_font", "factor_r2_size_from_z", "dci_disentanglement",
                "dci_completeness", "mig"):
        assert key in metrics, key
    assert "factor_r2_font_from_z" not in metrics  # a category is not regressed


def test_metric_registry_refuses_a_key_two_metrics_return_and_builds_the_headline():
    from disent.eval.metrics import Metric, headline, registered_metrics, run_metrics

    names = [m.name for m in registered_metrics()]
    assert names[0] == "class_probes" and len(names) == len(set(names))
    first = Metric("first", lambda ctx: {"shared": 1.0}, ())
    second = Metric("second", lambda ctx: {"shared": 2.0}, ())
    with pytest.raises(ValueError, match="'first' and 'second' both return the key 'shared'"):
        run_metrics(None, [first, second])
    line = headline({"class_from_s_mlp": 0.9123, "chance": 0.1, "unlisted": 5.0})
    assert line == "class_from_s_mlp 0.912, chance 0.100"


def test_the_leakage_yardstick_reads_a_class_holding_code_and_not_noise():
    """Constructed codes: one that holds the class is read in full (bits near H(y)); noise is read at chance, as the
    shuffled-label probe measures it, with about 0 bits."""
    from disent.eval.leakage import class_leakage

    rng = np.random.default_rng(0)
    y_train, y_test = rng.integers(0, 4, 800), rng.integers(0, 4, 400)
    noise = class_leakage(rng.normal(size=(800, 6)), y_train, rng.normal(size=(400, 6)), y_test, 4, max_epochs=15)
    holding = class_leakage(rng.normal(size=(800, 6)) + 3 * np.eye(6)[y_train], y_train,
                            rng.normal(size=(400, 6)) + 3 * np.eye(6)[y_test], y_test, 4, max_epochs=15)
    assert holding["acc"] > 0.9 and holding["bits"] > 0.7 * holding["entropy_bits"]
    assert abs(noise["acc"] - noise["shuffled_acc"]) < 0.1 and noise["acc"] < 0.4
    assert noise["bits"] < 0.1 and noise["shuffled_bits"] < 0.1 and noise["acc_std"] >= 0


def test_the_leakage_yardsticks_chance_is_averaged_over_one_permutation_per_seed():
    """On a code that clusters by class, a single shuffled-label probe maps whole clusters to one random class
    each, so one permutation's chance lands far from 1/K; the three seeds' permutations are averaged."""
    import unittest.mock

    from disent.eval import leakage

    rng = np.random.default_rng(0)
    y_train, y_test = rng.integers(0, 10, 1000), rng.integers(0, 10, 500)
    seen = []
    scores = leakage.probe_scores

    def recorded(codes, labels, *rest):
        seen.append(labels.copy())
        return scores(codes, labels, *rest)

    clustered = 4 * np.eye(10)
    with unittest.mock.patch.object(leakage, "probe_scores", recorded):
        out = leakage.class_leakage(clustered[y_train] + rng.normal(size=(1000, 10)) * 0.1, y_train,
                                    clustered[y_test] + rng.normal(size=(500, 10)) * 0.1, y_test, 10, max_epochs=5)
    permutations = seen[3:]
    assert len(permutations) == 3 and len({p.tobytes() for p in permutations}) == 3
    assert all(sorted(p) == sorted(y_train) and not np.array_equal(p, y_train) for p in permutations)
    assert out["acc"] > 0.95 and abs(out["shuffled_acc"] - 0.1) < 0.1


def test_the_unit_diagnosis_finds_a_class_hidden_in_units_the_decoder_barely_uses():
    """Constructed codes: two active units of pure noise, two inactive units (Var(mu) 1e-4) whose tiny means follow
    the class, as a learned log-variance allows. The diagnosis counts 2 active units, gives each unit its KL, and
    reads the class from the inactive units and not from the active ones."""
    from disent.eval.units import class_by_units, unit_kl

    rng = np.random.default_rng(0)

    def codes(n):
        y = rng.integers(0, 4, n)
        mu = np.concatenate([rng.normal(size=(n, 2)), 0.01 * (np.eye(4)[y][:, :2] + 0.1 * rng.normal(size=(n, 2)))], 1)
        logvar = np.concatenate([np.full((n, 2), -4.0), np.zeros((n, 2))], 1)
        return {"mu": mu.astype(np.float32), "logvar": logvar.astype(np.float32)}, y

    (train, y_train), (test, y_test) = codes(800), codes(400)
    out = class_by_units(train, y_train, test, y_test, 4, max_epochs=15)
    assert out["units_active"] == 2 and len(out["unit_kl"]) == 4
    assert out["unit_kl"][0] > 1.0 and out["unit_kl"][3] < 1e-3  # noise of sigma e^-2 costs nats; a still unit none
    assert out["units_kl_active"] == pytest.approx(sum(out["unit_kl"][:2]), rel=1e-3)
    assert out["leakage_mu_inactive_acc"] > 0.6 and out["leakage_mu_active_acc"] < 0.4
    assert out["units_informative"] == 2 and out["leakage_mu_quiet_acc"] > 0.6  # the same split by KL here
    assert unit_kl(np.zeros((3, 2)), np.zeros((3, 2))) == pytest.approx([0.0, 0.0])


def test_a_compiled_model_is_evaluated_on_an_uncompiled_copy():
    """Defect: evaluation ran the compiled training model, so each evaluation's batch, dtype and layout compiled
    graphs of their own on rank 0 (cold after every restart). A compiled model is evaluated on an eager float32 copy
    with its weights; an uncompiled float32 model is evaluated as it is."""
    from disent.eval.evaluate import for_evaluation
    from disent.models.vae import vae_from_config

    cfg = load_config("configs/glyphs.yaml", ["model.base_channels=8", "train.compile=true"])
    vae = vae_from_config(cfg)
    vae.encoder.compile()
    copy = for_evaluation(vae, cfg)
    assert copy is not vae and copy.encoder._compiled_call_impl is None
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), vae.state_dict().values()))
    plain = vae_from_config(load_config("configs/glyphs.yaml", ["model.base_channels=8"]))
    assert for_evaluation(plain, load_config("configs/glyphs.yaml")) is plain


def test_grids_fit_a_test_split_smaller_than_two_grid_rows(tmp_path):
    """9 test images for a grid of 16 crashed interpolation_grid with an IndexError; the grids now take half each."""
    from disent.eval.evaluate import save_grids

    rng = np.random.default_rng(0)
    test = Split(rng.integers(0, 255, (9, 1, 28, 28), dtype=np.uint8), rng.integers(0, 3, 9),
                 np.zeros((9, 0), np.float32), [])
    paths = save_grids(DisentVAE(1, 28, 4, 4, 8).eval(), test, tmp_path, 16, torch.device("cpu"), 0)
    assert all(Image.open(p).format == "PNG" for p in paths.values())


def test_a_failing_metric_keeps_the_others_and_is_named():
    from disent.eval.metrics import Metric, run_metrics

    def broken(ctx):
        raise IndexError("index 8 is out of bounds")

    out = run_metrics(None, [Metric("first", lambda ctx: {"a": 1.0}, ()), Metric("broken", broken, ()),
                             Metric("last", lambda ctx: {"b": 2.0}, ())])
    assert out["a"] == 1.0 and out["b"] == 2.0
    assert out["failed_metrics"] == {"broken": "IndexError: index 8 is out of bounds"}
