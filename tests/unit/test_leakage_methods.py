"""The methods against class leakage into z (issue 24), on constructed codes: a code that holds the class is
caught, a code of pure noise leaves them at zero; and each is a config option that trains what it should."""
from __future__ import annotations

import math

import pytest
import torch

from disent.models.discriminator import build_critics
from disent.models.loss_weights import LossWeights
from disent.models.objective import Objective
from disent.models.probe_critic import ProbeCritic, standardised
from disent.models.vae import DisentVAE
from disent.train.engines import frozen
from tests.support.train_helpers import ROOT


def _codes(n: int, classes: int, shift: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n codes of 8 dims; the class moves dimension 0 linearly and dimension 1 by a non-monotone function of it
    (shift 0: pure noise)."""
    y = torch.randint(0, classes, (n,), generator=g)
    mu = torch.randn(n, 8, generator=g)
    mu[:, 0] += shift * y.float()
    mu[:, 1] += shift * (y.float() ** 2 % 3)
    return mu, y


def _trained_critic(shift: float, updates: int = 60) -> tuple[ProbeCritic, torch.Generator]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    critic = ProbeCritic(8, 4, steps=2, refit_every=25)
    for _ in range(updates):
        critic.update(*_codes(96, 4, shift, g))
    return critic, g


def test_the_probe_critic_catches_a_code_that_holds_the_class_and_stays_near_zero_on_noise():
    noise, g = _trained_critic(0.0)
    on_noise = noise.encoder_loss(_codes(1024, 4, 0.0, g)[0])
    holding, g = _trained_critic(1.0)
    mu, y = _codes(1024, 4, 1.0, g)
    on_holding = holding.encoder_loss(mu)
    assert 0 <= on_noise < 0.05  # a fresh batch of noise: the critic can do little better than a uniform guess
    assert on_holding > 0.5 and on_holding > 10 * on_noise
    assert (holding.logits(standardised(mu)).argmax(1) == y).float().mean() > 0.4  # chance 0.25
    shrunk = holding.encoder_loss(mu * 1e-2)  # codes are standardised on their batch: shrinking hides nothing
    assert torch.allclose(shrunk, on_holding, rtol=1e-4)


def test_the_probe_critic_trains_only_itself_keeps_its_state_in_buffers_and_refits_on_schedule():
    critic = ProbeCritic(8, 4, steps=1, refit_every=3)
    assert list(critic.parameters()) == []  # nothing for the engine's optimizer, freezing or casting
    mu = torch.randn(96, 8, requires_grad=True)
    critic.encoder_loss(mu).backward()
    assert mu.grad is not None and mu.grad.abs().sum() > 0  # the encoder's loss reaches the code only
    g = torch.Generator().manual_seed(0)
    weights = []
    for _ in range(4):
        critic.update(*_codes(96, 4, 1.0, g))
        weights.append(critic.w_0_weight.clone())
    assert int(critic.seen) == 4 * 96 and int(critic.updates) == 4
    saved = {k: v.clone() for k, v in critic.state_dict().items()}
    assert {"codes", "labels", "seen", "updates", "w_0_weight", "w_4_bias"} <= set(saved)
    again = ProbeCritic(8, 4, steps=1, refit_every=3)
    again.load_state_dict(saved)
    assert again._updates == 4 and torch.equal(again.w_0_weight, critic.w_0_weight)
    mu = torch.randn(32, 8)
    assert torch.equal(again.logits(mu), critic.logits(mu))


def test_the_probe_critic_is_a_loss_option_that_trains_the_encoder_and_learns_in_the_discriminators_step():
    torch.manual_seed(0)
    cfg = LossWeights(class_probe=1.0, class_probe_steps=2, class_probe_refit_every=10)
    vae = DisentVAE(1, 28, 4, 4, 8)
    disc = build_critics("pair", 1, 28, 4, 8, 4, cfg)
    assert (disc.class_probe.steps, disc.class_probe.refit_every) == (2, 10)
    x1, x1p, x2, x2p, y2 = _batch(8)
    y1 = torch.randint(0, 4, (8,))
    with frozen(disc):
        loss, terms, fakes = Objective(cfg, 4).vae_losses(vae, disc, x1, x1p, x2, x2p, y2, 0, y1=y1)
        loss.backward()
    assert "class_probe" in terms and terms["class_probe"] >= 0
    assert vae.encoder.f_z[0].weight.grad is not None
    _, d_terms = Objective(cfg, 4).discriminator_losses(disc, x2, x2p, y2, fakes)
    assert {"class_probe_critic", "class_probe_critic_acc"} <= set(d_terms) and int(disc.class_probe.seen) == 24
    with pytest.raises(ValueError, match="loss.class_probe > 0 needs the class of x1"):
        Objective(cfg, 4).vae_losses(vae, disc, x1, x1p, x2, x2p, y2, 0)


def _batch(b: int):
    g = torch.Generator().manual_seed(0)
    x = [torch.rand(b, 1, 28, 28, generator=g) for _ in range(4)]
    return (*x, torch.randint(0, 4, (b,), generator=g))


def test_the_class_channel_feeds_the_decoder_class_codes_and_distils_s_toward_them():
    torch.manual_seed(0)
    vae = DisentVAE(1, 28, 4, 4, 8, class_channel_classes=4)
    plain = DisentVAE(1, 28, 4, 4, 8)
    assert vae.class_codes.weight.shape == (4, 4) and plain.class_codes is None
    disc = build_critics("pair", 1, 28, 4, 8, 4, LossWeights())
    x1, x1p, x2, x2p, y2 = _batch(8)
    y1 = torch.randint(0, 4, (8,))
    with frozen(disc):
        loss, terms, _ = Objective(LossWeights(), 4).vae_losses(vae, disc, x1, x1p, x2, x2p, y2, 0, y1=y1)
        loss.backward()
    assert "class_code" in terms and terms["class_code"] > 0
    assert vae.class_codes.weight.grad is not None  # the decoder's class comes from c_y
    assert vae.encoder.f_s[0].weight.grad is not None  # s learns through the swap term and the distillation
    with pytest.raises(ValueError, match="model.class_channel needs the class of x1"):
        Objective(LossWeights(), 4).vae_losses(vae, disc, x1, x1p, x2, x2p, y2, 0)


def test_the_class_code_term_is_zero_when_s_is_the_class_code_and_the_code_is_fixed():
    from disent.models.objective import class_code_term

    codes = torch.randn(4, 6, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 1])
    assert class_code_term(codes[y].detach(), codes[y]) == 0
    s = torch.randn(5, 6, requires_grad=True)
    class_code_term(s, codes[y]).backward()
    assert codes.grad is None and s.grad is not None  # c_y is the decoder's: only s moves toward it


def test_s_dim_0_is_a_plain_vae_the_reference_for_leakage():
    vae = DisentVAE(1, 28, 0, 4, 8)
    x = torch.rand(3, 1, 28, 28)
    s, mu, _ = vae.encode(x)
    assert s.shape == (3, 0) and vae.encoder.f_s is None and vae.decode(mu, s).shape == (3, 1, 28, 28)
    disc = build_critics("pair", 1, 28, 4, 8, 4, LossWeights())
    x1, x1p, x2, x2p, y2 = _batch(4)
    with frozen(disc):
        loss, terms, _ = Objective(LossWeights(swap=0, adversarial=0), 4).vae_losses(vae, disc, x1, x1p, x2, x2p, y2,
                                                                                   0)
        loss.backward()
    assert torch.isfinite(loss) and vae.encoder.f_z[0].weight.grad is not None


def test_a_plain_vae_config_with_terms_that_need_s_is_refused_in_one_line():
    from disent.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"'model.s_dim' is 0 .* loss.swap=1.0.*set loss.swap=0"):
        load_config(ROOT / "configs/glyphs.yaml", ["model.s_dim=0"])
    plain = ["model.s_dim=0", "loss.swap=0", "loss.adversarial=0", "loss.latent_adversarial=0",
             "loss.specified_consistency=0", "loss.class_mmd=0", "loss.reverse_cycle=0"]
    assert load_config(ROOT / "configs/glyphs.yaml", plain).model.s_dim == 0
    with pytest.raises(ConfigError, match="must be >= 0"):
        load_config(ROOT / "configs/glyphs.yaml", ["model.s_dim=-1"])


def test_known_factors_become_probe_inputs_with_categories_one_hot():
    import numpy as np

    from disent.eval.evaluate import Split, factor_features

    def split(fonts, sizes):
        factors = np.stack([np.array(fonts, np.float32), np.array(sizes, np.float32)], axis=1)
        return Split(np.zeros((len(fonts), 1, 2, 2), np.uint8), np.zeros(len(fonts), np.int64), factors,
                     ["font", "size"], ["font"])

    train, test = factor_features(split([0, 2], [0.5, 0.7]), split([1, 1, 0], [0.1, 0.2, 0.3]))
    assert train.shape == (2, 4) and test.shape == (3, 4)
    assert train[1].tolist() == pytest.approx([0, 0, 1, 0.7]) and test[0].tolist() == pytest.approx([0, 1, 0, 0.1])


def test_every_term_is_declared_once_and_everything_reads_the_declaration():
    """TERMS is the one declaration: each has a weight in LossWeights and base.yaml, its function exists in the
    objective, its critic in Critics; the plain-VAE check refuses exactly the terms on s; the critics built and the
    labels asked for follow the weights."""
    import yaml

    from disent.config import ConfigError, load_config
    from disent.models import objective
    from disent.models.discriminator import Critics
    from disent.models.loss_weights import TERMS

    base = yaml.safe_load((ROOT / "configs/base.yaml").read_text())["loss"]
    for term in TERMS:
        assert hasattr(LossWeights(), term.name) and term.name in base, term.name
        assert term.function is None or callable(getattr(objective, term.function)), term.name
    assert [t.name for t in TERMS if not t.on_s] == ["reconstruction", "kl"]
    every = {t.name: 1.0 for t in TERMS}
    disc = build_critics("pair", 1, 28, 4, 8, 4, LossWeights(**every))
    assert isinstance(disc, Critics) and not hasattr(disc, "num_classes")
    assert {t.critic for t in TERMS if t.critic} == {n for n, m in disc.named_children() if n != "image"}
    assert Objective(LossWeights(**every), 4).needs_labels == [t.name for t in TERMS if t.needs_labels]
    assert set(Objective(LossWeights(**every), 4).extensions) == {t.name for t in TERMS if t.function}
    for term in TERMS:
        if term.on_s:
            off = [f"loss.{t.name}=0" for t in TERMS if t.on_s and t.name != term.name]
            with pytest.raises(ConfigError, match=f"loss.{term.name}=1.0"):
                load_config(ROOT / "configs/base.yaml", ["name=x", "data.url=d", "model.s_dim=0", *off,
                                                         f"loss.{term.name}=1.0"])


def test_a_fixed_variance_posterior_gives_mu_only_and_its_kl_is_an_l2_penalty_on_mu():
    """model.posterior_sigma: f_z outputs mu alone, logvar is log sigma^2 everywhere, z = mu + sigma * eps, and the
    KL term's gradient on mu is mu itself (0.5 |mu|^2 plus a constant), whatever the encoder did."""
    from disent.config import load_config
    from disent.models.objective import kl_term
    from disent.models.vae import vae_from_config

    torch.manual_seed(0)
    vae = DisentVAE(1, 28, 4, 6, 8, posterior_sigma=0.1)
    assert vae.encoder.f_z[-1].out_features == 6  # no log-variance head
    s, mu, logvar = vae.encode(torch.rand(5, 1, 28, 28))
    assert mu.shape == logvar.shape == (5, 6) and torch.allclose(logvar, torch.full_like(mu, 2 * math.log(0.1)))
    z = torch.stack([vae.sample(mu, logvar) for _ in range(2000)])
    assert (z.std(0) - 0.1).abs().max() < 0.01 and (z.mean(0) - mu).abs().max() < 0.01
    codes = torch.randn(7, 6, requires_grad=True)
    constant = kl_term(torch.zeros(7, 6), torch.full((7, 6), 2 * math.log(0.1)))
    penalty = kl_term(codes, torch.full((7, 6), 2 * math.log(0.1)))
    assert torch.isclose(penalty - constant, 0.5 * codes.pow(2).sum(1).mean())
    penalty.backward()
    assert torch.allclose(codes.grad, codes.detach() / 7)

    cfg = load_config(ROOT / "configs/glyphs.yaml", ["model.posterior_sigma=0.5"])
    assert vae_from_config(cfg).encoder.fixed_logvar == pytest.approx(2 * math.log(0.5))
    assert vae_from_config(load_config(ROOT / "configs/glyphs.yaml")).encoder.fixed_logvar is None
    from disent.config import ConfigError

    with pytest.raises(ConfigError, match="'model.posterior_sigma' must be >= 0"):
        load_config(ROOT / "configs/glyphs.yaml", ["model.posterior_sigma=-1"])


def test_z_sees_s_false_gives_f_z_the_trunk_alone():
    """model.z_sees_s=false: mu and logvar do not move when only s changes (f_z(x), not f_z(x, s))."""
    from disent.config import load_config
    from disent.models.vae import vae_from_config

    torch.manual_seed(0)
    vae = vae_from_config(load_config(ROOT / "configs/glyphs.yaml", ["model.z_sees_s=false", "model.base_channels=8"]))
    trunk_features = vae.encoder.f_z[0].in_features
    assert trunk_features == vae_from_config(load_config(ROOT / "configs/glyphs.yaml", ["model.base_channels=8"])
                                             ).encoder.f_z[0].in_features - 16
    x = torch.rand(3, 1, 32, 32)
    h = vae.encoder.trunk(x)
    s, mu, logvar = vae.encode(x)
    out = vae.encoder.f_z(h)
    assert torch.allclose(mu, out[:, :16]) and s.shape == (3, 16)


def test_the_critics_draw_their_initial_weights_in_a_fixed_order():
    """The image discriminator first, then each critic in TERMS' order: what a seed gives a config does not depend on
    how the critics are declared (a change of order changed every run's figures)."""
    from disent.models.discriminator import ClassMomentCritic, LatentCritic, build_discriminator

    weights = LossWeights(latent_adversarial=1.0, class_moments=1.0)
    torch.manual_seed(0)
    built = build_critics("pair", 1, 28, 4, 8, 4, weights)
    torch.manual_seed(0)
    expected = [build_discriminator("pair", 1, 28, 4, 8), LatentCritic(4), ClassMomentCritic(4, 4)]
    for mine, theirs in zip((built.image, built.latent, built.class_moments), expected):
        assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()))
