"""The model and the objective in plain torch: shapes, finite losses, which weights get gradients."""
from __future__ import annotations

import pytest
import torch

from disent.models.loss_weights import LossWeights
from disent.models.discriminator import build_critics, build_discriminator
from disent.models.vae import DisentVAE
from disent.models.objective import Objective
from disent.models.probe_critic import standardised
from disent.train.engines import VAEObjective, frozen


def batch(b=4, c=1, size=28, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = lambda: torch.rand(b, c, size, size, generator=g)  # noqa: E731
    return x(), x(), x(), x(), torch.randint(0, classes, (b,), generator=g)


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3), (64, 3)])
def test_shapes(size, channels):
    vae = DisentVAE(channels, size, s_dim=4, z_dim=3, base_channels=8)
    x = torch.rand(2, channels, size, size)
    s, mu, logvar = vae.encode(x)
    assert s.shape == (2, 4) and mu.shape == logvar.shape == (2, 3)
    assert vae.decode(mu, s).shape == x.shape
    for mode in ("pair", "label"):
        disc = build_discriminator(mode, channels, size, 5, 8)
        assert disc(x, x, torch.tensor([0, 4])).shape == (2,)


@pytest.mark.parametrize("mode", ["pair", "label"])
@pytest.mark.parametrize("latent", [0.0, 1.0])
def test_vae_step_never_updates_the_frozen_discriminator(mode, latent):
    torch.manual_seed(0)
    vae = DisentVAE(1, 28, 4, 4, 8)
    cfg = LossWeights(reconstruct_x1_prime=True, reconstruct_x2=True, latent_adversarial=latent)
    disc = build_critics(mode, 1, 28, 4, 8, 4, cfg)
    x1, x1p, x2, x2p, y2 = batch()
    with frozen(disc):
        total, terms, fakes = VAEObjective(vae, Objective(cfg, 4))(x1, x1p, x2, x2p, y2, discriminator=disc, step=0)
        total.backward()
    assert all(p.requires_grad for p in disc.parameters())  # unfrozen again
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.grad is not None for p in vae.parameters())
    assert set(terms) == {"reconstruction", "kl", "swap", "adversarial"} | ({"latent_adversarial"} if latent else set())
    assert all(torch.isfinite(v) for v in terms.values()) and not any(v.requires_grad for v in terms.values())
    assert not fakes.from_z1.requires_grad and fakes.from_z1.shape == x1.shape

    d_loss, d_terms = Objective(cfg, 4).discriminator_losses(disc, x2, x2p, y2, fakes)
    d_loss.backward()
    assert all(p.grad is not None for p in disc.parameters())
    assert 0.0 <= d_terms["disc_acc_real"] <= 1.0 and 0.0 <= d_terms["disc_acc_fake"] <= 1.0
    expected = d_terms["disc_real"] + d_terms["disc_fake"] + (d_terms["latent_critic"] if latent else 0)
    assert torch.isclose(d_loss, expected)
    if latent:
        assert 0.0 <= d_terms["latent_critic_acc"] <= 1.0


def test_adversarial_warmup_scales_only_the_adversarial_term():
    torch.manual_seed(0)
    cfg = LossWeights(adversarial=1.0, adversarial_warmup_steps=10)
    vae, disc = DisentVAE(1, 28, 4, 4, 8), build_critics("pair", 1, 28, 4, 8, 4, cfg)
    args = batch()
    torch.manual_seed(1)
    at0, terms0, _ = Objective(cfg, 4).vae_losses(vae, disc, *args, step=0)
    torch.manual_seed(1)
    at10, terms10, _ = Objective(cfg, 4).vae_losses(vae, disc, *args, step=10)
    assert torch.isclose(at10 - at0, terms10["adversarial"])


def test_class_adversary_trains_its_critic_on_mu_and_pushes_the_encoder_to_a_uniform_guess():
    torch.manual_seed(0)
    vae = DisentVAE(1, 28, 4, 4, 8, decoder="upsample")
    cfg = LossWeights(class_adversarial=1.0)
    disc = build_critics("pair", 1, 28, 4, 8, 4, cfg)
    x1, x1p, x2, x2p, y2 = batch()
    y1 = torch.randint(0, 4, (x1.shape[0],))
    with frozen(disc):
        total, terms, fakes = VAEObjective(vae, Objective(cfg, 4))(x1, x1p, x2, x2p, y2, discriminator=disc, step=0,
                                                                   y1=y1)
        total.backward()
    assert "class_adversarial" in terms and terms["class_adversarial"] >= -1e-6  # 0 only at a uniform guess
    assert all(p.grad is None for p in disc.parameters())
    assert vae.encoder.f_z[0].weight.grad is not None
    d_loss, d_terms = Objective(cfg, 4).discriminator_losses(disc, x2, x2p, y2, fakes)
    d_loss.backward()
    assert all(p.grad is not None for p in disc.classes.parameters())
    assert 0.0 <= d_terms["class_critic_acc"] <= 1.0
    with pytest.raises(ValueError, match="y1"):
        Objective(cfg, 4).vae_losses(vae, disc, x1, x1p, x2, x2p, y2, step=0)


def test_reverse_cycle_and_specified_consistency_train_the_vae_only():
    torch.manual_seed(0)
    vae = DisentVAE(1, 28, 4, 4, 8)
    cfg = LossWeights(reverse_cycle=1.0, specified_consistency=1.0)
    disc = build_critics("pair", 1, 28, 4, 8, 4, cfg)
    x1, x1p, x2, x2p, y2 = batch()
    y1 = torch.randint(0, 4, (x1.shape[0],))
    with frozen(disc):
        total, terms, _ = Objective(cfg, 4).vae_losses(vae, disc, x1, x1p, x2, x2p, y2, step=0, y1=y1)
        total.backward()
    assert terms["reverse_cycle"] > 0 and terms["specified_consistency"] > 0
    assert vae.encoder.f_z[0].weight.grad is not None
    assert all(p.grad is None for p in disc.parameters())
    # The reverse cycle alone trains the encoder, never the decoder (which would learn to write a
    # private code for z into generated images).
    vae.zero_grad(set_to_none=True)
    cycle_only = LossWeights(reconstruction=0, swap=0, adversarial=0, kl=0, reverse_cycle=1.0)
    with frozen(disc):
        total, _, _ = Objective(cycle_only, 4).vae_losses(vae, disc, x1, x1p, x2, x2p, y2, step=0, y1=y1)
        total.backward()
    assert vae.encoder.f_z[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in vae.decoder.parameters())


def test_class_moment_critic_sees_class_in_position_and_in_spread_and_not_in_noise():
    from disent.models.discriminator import ClassMomentCritic

    g = torch.Generator().manual_seed(0)

    def gap_after(shift: float, spread: float) -> float:
        critic = ClassMomentCritic(z_dim=4, num_classes=3, momentum=0.1)
        for _ in range(100):
            labels = torch.randint(0, 3, (96,), generator=g)
            code = torch.randn(96, 4, generator=g)
            code[:, 0] += shift * labels
            code[:, 1] *= 1 + spread * labels
            critic.update(code, labels)
        return critic.gap().item()

    noise = gap_after(0.0, 0.0)
    assert noise < 0.1
    assert gap_after(2.0, 0.0) > 10 * noise  # the class moves the code
    assert gap_after(0.0, 2.0) > 10 * noise  # the class only widens the code: a mean probe misses it


def test_class_moments_term_trains_the_encoder_and_its_critic_only_in_the_discriminator_step():
    torch.manual_seed(0)
    vae = DisentVAE(1, 28, 4, 4, 8)
    cfg = LossWeights(class_moments=1.0)
    disc = build_critics("pair", 1, 28, 4, 8, 4, cfg)
    x1, x1p, x2, x2p, y2 = batch()
    y1 = torch.randint(0, 4, (x1.shape[0],))
    before = disc.class_moments.centroids.clone()
    with frozen(disc):
        total, terms, fakes = Objective(cfg, 4).vae_losses(vae, disc, x1, x1p, x2, x2p, y2, step=0, y1=y1)
        total.backward()
    assert terms["class_moments"] >= 0 and vae.encoder.f_z[0].weight.grad is not None
    assert torch.equal(disc.class_moments.centroids, before)
    _, d_terms = Objective(cfg, 4).discriminator_losses(disc, x2, x2p, y2, fakes)
    assert not torch.equal(disc.class_moments.centroids, before) and d_terms["class_moment_gap"] >= 0
    with pytest.raises(ValueError, match="y1"):
        Objective(cfg, 4).vae_losses(vae, disc, x1, x1p, x2, x2p, y2, step=0)


def test_upsample_decoder_renders_every_supported_size():
    for channels, size in ((1, 28), (3, 32), (3, 64)):
        vae = DisentVAE(channels, size, 4, 3, 8, decoder="upsample")
        assert vae.decode(torch.zeros(2, 3), torch.zeros(2, 4)).shape == (2, channels, size, size)


def _codes(b: int, classes: int, shift: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3 x b codes of 8 dims whose first dimension moves by `shift` per class (0: pure noise)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3 * b) % classes
    mu = torch.randn(3 * b, 8, generator=g)
    mu[:, 0] += shift * labels.float()
    return mu, labels


def test_class_mmd_catches_a_code_that_holds_the_class_and_is_zero_on_noise():
    from disent.models.objective import class_mmd_per_class

    noise = torch.stack([class_mmd_per_class(*_codes(64, 4, 0.0, seed), 4) for seed in range(20)])
    holding = torch.stack([class_mmd_per_class(*_codes(64, 4, 1.0, seed), 4) for seed in range(20)])
    assert noise.mean(0).abs().max() < 0.005  # unbiased: 0 in expectation, for every class
    assert (holding.mean(0) > 0.01).all() and holding.mean() > 5 * noise.std()  # every class stands out
    shrunk = class_mmd_per_class(*(lambda m, y: (m * 1e-2, y))(*_codes(64, 4, 1.0, 0)), 4)
    assert torch.allclose(shrunk, holding[0], rtol=1e-3, atol=1e-5)  # shrinking the code hides nothing


def test_class_mmd_is_a_loss_option_that_trains_the_encoder():
    torch.manual_seed(0)
    vae = DisentVAE(1, 28, 4, 4, 8)
    disc = build_critics("pair", 1, 28, 4, 8, 4, LossWeights(class_mmd=1.0))
    x1, x1p, x2, x2p, y2 = batch(b=8)
    with frozen(disc):
        loss, terms, _ = Objective(LossWeights(class_mmd=1.0), 4).vae_losses(vae, disc, x1, x1p, x2, x2p, y2, 0,
                                                                             y1=torch.randint(0, 4, (8,)))
        loss.backward()
    assert "class_mmd" in terms and torch.isfinite(terms["class_mmd"])
    assert vae.encoder.f_z[0].weight.grad is not None
    with pytest.raises(ValueError, match="loss.class_mmd > 0 needs the class of x1"):
        Objective(LossWeights(class_mmd=1.0), 4).vae_losses(vae, disc, x1, x1p, x2, x2p, y2, 0)


def test_the_swap_contrast_is_low_when_z_keeps_the_image_without_its_class_and_high_otherwise():
    """same_class_info_nce on constructed codes: a style code that the swap keeps and that holds no class scores
    far below one that also holds the class (its swap moves to the other class), and below an empty code (its
    positive is one of many alike); shrinking the code changes nothing."""
    from disent.models.objective import same_class_info_nce

    g = torch.Generator().manual_seed(0)
    b, classes = 64, 4
    y1, y2 = torch.arange(b) % classes, (torch.arange(b) + 1) % classes
    labels = torch.cat([y1, y1, y2])
    style = torch.randn(3 * b, 8, generator=g)
    not_x1 = ~torch.eye(b, 3 * b, dtype=torch.bool)

    def loss(codes, swapped):
        unit = torch.nn.functional.normalize(standardised(torch.cat([codes, swapped])), dim=1)
        real, swapped = unit[: 3 * b], unit[3 * b :]
        return (same_class_info_nce(real[:b], swapped, real, (labels[None] == y1[:, None]) & not_x1)
                + same_class_info_nce(swapped, real[:b], real, (labels[None] == y2[:, None]) & not_x1)) / 2

    shift = torch.zeros(classes, 8)
    shift[:, :4] = 3 * torch.randn(classes, 4, generator=g)
    keeps_style = loss(style, style[:b])
    holds_class = loss(style + shift[labels], style[:b] + shift[y2])
    empty = loss(0.05 * torch.randn(3 * b, 8, generator=g), 0.05 * torch.randn(b, 8, generator=g))
    assert keeps_style < 1.0 and holds_class > keeps_style + 3.0 and empty > keeps_style + 3.0
    assert torch.allclose(loss(1e-2 * style, 1e-2 * style[:b]), keeps_style, atol=1e-4)


def test_the_swap_contrast_is_a_loss_option_that_trains_the_encoder_only():
    torch.manual_seed(0)
    vae = DisentVAE(1, 28, 4, 4, 8)
    cfg = LossWeights(reconstruction=0, swap=0, adversarial=0, kl=0, swap_contrast=1.0)
    disc = build_critics("pair", 1, 28, 4, 8, 4, cfg)
    x1, x1p, x2, x2p, y2 = batch(b=8)
    with frozen(disc):
        loss, terms, _ = Objective(cfg, 4).vae_losses(vae, disc, x1, x1p, x2, x2p, y2, 0, y1=torch.randint(0, 4, (8,)))
        loss.backward()
    assert torch.isfinite(terms["swap_contrast"]) and terms["swap_contrast"] > 0
    assert vae.encoder.f_z[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in vae.decoder.parameters())  # the swap is detached
    with pytest.raises(ValueError, match="loss.swap_contrast > 0 needs the class of x1"):
        Objective(cfg, 4).vae_losses(vae, disc, x1, x1p, x2, x2p, y2, 0)


def test_the_reverse_cycle_feeds_the_encoder_float32_under_bf16_autocast():
    """A compiled encoder compiles a graph per input dtype: the reverse cycle's input (the decoder's bf16 output under
    autocast) is given in float32, like the real images, so it adds no variant."""
    torch.manual_seed(0)
    vae = DisentVAE(1, 28, 4, 4, 8)
    cfg = LossWeights(reverse_cycle=1.0)
    disc = build_critics("pair", 1, 28, 4, 8, 4, cfg)
    seen = []
    encode = vae.encode
    vae.encode = lambda x: seen.append(x.dtype) or encode(x)
    x1, x1p, x2, x2p, y2 = batch()
    with frozen(disc), torch.autocast("cpu", dtype=torch.bfloat16):
        Objective(cfg, 4).vae_losses(vae, disc, x1, x1p, x2, x2p, y2, step=0)
    assert seen == [torch.float32, torch.float32]  # the step's own pass, then the reverse cycle's


def test_pruning_makes_the_quiet_units_the_prior_and_keeps_the_others(caplog):
    """model.prune_below_kl: units whose KL over the stream is below the bound get mean 0 and variance 1 for every
    image (so no probe reads anything from them); the others are untouched; the mask is in the state dict."""
    from disent.train.pruning import prune_quiet_units

    torch.manual_seed(0)
    vae = DisentVAE(1, 28, 4, 6, 8, prunes_units=True)
    last = vae.encoder.f_z[-1]
    with torch.no_grad():  # units 0 and 1 carry the image (KL > 2 nats), units 2..5 a faint trace of it
        last.weight.mul_(0.01)
        last.weight[:2] *= 300
        last.bias.zero_()
        last.bias[:2] = 2.0
    x = torch.rand(16, 1, 28, 28)
    _, mu_before, logvar_before = vae.encode(x)
    assert mu_before[:, 2:].abs().max() > 0  # a quiet unit still moves with the image before pruning
    batches = iter([{"x1": torch.rand(16, 1, 28, 28)} for _ in range(40)])
    pruned = prune_quiet_units(vae, batches, lambda b: b, below_kl=0.5)
    assert pruned == [2, 3, 4, 5]
    _, mu, logvar = vae.encode(x)
    assert torch.equal(mu[:, 2:], torch.zeros(16, 4)) and torch.equal(logvar[:, 2:], torch.zeros(16, 4))
    assert torch.equal(mu[:, :2], mu_before[:, :2]) and torch.equal(logvar[:, :2], logvar_before[:, :2])
    assert vae.state_dict()["encoder.unit_mask"].tolist() == [1, 1, 0, 0, 0, 0]
    assert "encoder.unit_mask" not in DisentVAE(1, 28, 4, 6, 8).state_dict()  # off: checkpoints as before
    with pytest.raises(ValueError, match="prunes_units"):
        prune_quiet_units(DisentVAE(1, 28, 4, 6, 8), batches, lambda b: b, below_kl=0.5)
    with caplog.at_level("WARNING", logger="disent.train.pruning"):
        more = iter([{"x1": torch.rand(16, 1, 28, 28)} for _ in range(32)])
        assert prune_quiet_units(vae, more, lambda b: b, below_kl=100.0) == [0, 1, 2, 3, 4, 5]
    assert "every unit of z was below model.prune_below_kl=100.0 nats" in caplog.text
