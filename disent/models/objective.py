"""The training objective of Mathieu et al. (2016), one step of it.

With x1, x1' of one class and an independent same-class pair x2, x2':
  1. reconstruction  Dec(z1, s1) -> x1, plus KL(q(z1|x1, s1) || N(0, I))
  2. swap            Dec(z1, s1') -> x1: s must carry what x1 and x1' share (the class)
  3. adversarial     Dec(z1, s2) and Dec(z_prior, s2) must pass as real members of x2's class,
                     so z1 cannot smuggle x1's class into the image.
The discriminator is trained to tell the real (x2, x2') from those fakes.
Optionally (loss.latent_adversarial > 0, an extension): a latent critic guesses whether two
unspecified codes come from one class (mu1, mu1') or from independent images (mu1, mu2), and
the encoder is trained to make same-class pairs look independent, so z carries no class.
Optionally (loss.class_adversarial > 0, an extension using the labels of x1): a class critic
guesses the class of x1 from mu1, and the encoder is trained to leave its guess uniform.
Optionally (loss.class_moments > 0, an extension using the labels): a critic keeps running
per-class means of the standardised mean of z and of its square, and the encoder is pushed to make
them equal, so no class shows in where or how widely its codes lie.
Optionally (loss.reverse_cycle > 0, Cycle-VAE's reverse cycle): Dec(z_prior, s2) is encoded again
and its mean of z must give z_prior back, so the encoder reads z the same way whatever the class.
Optionally (loss.specified_consistency > 0, using only the grouping): s1 and s1' are pulled
together relative to s1 and s2, so s cannot keep what is particular to one image.
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import torch
import torch.nn.functional as F

from disent.models.loss_weights import LossWeights
from disent.models.vae import DisentVAE, kl_to_standard_normal, reconstruction_loss


@dataclass
class Fakes:
    """Generated images the discriminator sees next, detached from the VAE graph."""

    from_z1: torch.Tensor  # Dec(z1, s2)
    from_prior: torch.Tensor  # Dec(z_prior, s2)
    mu1: torch.Tensor  # unspecified codes for the latent critic: (mu1, mu1') same class,
    mu1p: torch.Tensor  # (mu1, mu2) independent
    mu2: torch.Tensor
    y1: torch.Tensor | None = None  # x1's class, for the class critic


def kl_weight(cfg: LossWeights, z_dim: int, pixels: int) -> float:
    """Per-pixel reconstruction pairs with a KL scaled by z_dim / pixels (the authors' ratio)."""
    return cfg.kl * (z_dim / pixels if cfg.kl_scale_by_latent_ratio else 1.0)


def adversarial_ramp(cfg: LossWeights, step: int) -> float:
    """Optional linear warm-up of the adversarial weight over the first steps."""
    if cfg.adversarial_warmup_steps <= 0:
        return 1.0
    return min(1.0, step / cfg.adversarial_warmup_steps)


def vae_losses(
    vae: DisentVAE,
    discriminator: torch.nn.Module,
    x1: torch.Tensor,
    x1p: torch.Tensor,
    x2: torch.Tensor,
    x2p: torch.Tensor,
    y2: torch.Tensor,
    cfg: LossWeights,
    step: int,
    y1: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], Fakes]:
    """The VAE's total loss, its terms (detached), and the fakes for the discriminator.

    `discriminator` is the bare `Critics` module with frozen parameters: gradients flow through
    it into the VAE but never into its own weights.
    """
    b = x1.shape[0]
    # One encoder pass over x1, x1' and x2.
    s, mu, logvar = vae.encode(torch.cat([x1, x1p, x2]))
    s1, s1p, s2 = s[:b], s[b : 2 * b], s[2 * b : 3 * b]
    mu1, logvar1 = mu[:b], logvar[:b]
    z1 = vae.sample(mu1, logvar1)
    z_prior = vae.prior(b, like=z1)

    # One decoder pass: Dec(z1, s1), Dec(z1, s1'), Dec(z1, s2), Dec(z_prior, s2).
    logits = vae.decode(torch.cat([z1, z1, z1, z_prior]), torch.cat([s1, s1p, s2, s2]))
    recon1, swap1, fake_z1, fake_prior = logits.split(b)

    terms = {"reconstruction": reconstruction_loss(recon1, x1)}
    if cfg.reconstruct_x1_prime:
        z1p = vae.sample(mu[b : 2 * b], logvar[b : 2 * b])
        terms["reconstruction"] = terms["reconstruction"] + reconstruction_loss(vae.decode(z1p, s1p), x1p)
    if cfg.reconstruct_x2:
        z2 = vae.sample(mu[2 * b : 3 * b], logvar[2 * b : 3 * b])
        terms["reconstruction"] = terms["reconstruction"] + reconstruction_loss(vae.decode(z2, s2), x2)
    terms["kl"] = kl_to_standard_normal(mu1, logvar1)
    terms["swap"] = reconstruction_loss(swap1, x1)

    images = torch.sigmoid(torch.cat([fake_z1, fake_prior]))
    mu1p, mu2 = mu[b : 2 * b], mu[2 * b : 3 * b]
    judged, same_class = discriminator(images, torch.cat([x2, x2]), torch.cat([y2, y2]), mu1, mu1p)
    terms["adversarial"] = F.binary_cross_entropy_with_logits(judged, torch.ones_like(judged))
    if same_class is not None:  # make same-class codes look like codes of independent images
        terms["latent_adversarial"] = F.binary_cross_entropy_with_logits(same_class, torch.zeros_like(same_class))
    for key in ("class_adversarial", "class_moments"):
        if getattr(cfg, key) > 0 and y1 is None:
            raise ValueError(f"loss.{key} > 0 needs the class of x1 (y1)")
    class_logits = discriminator.guess_class(mu1) if cfg.class_adversarial > 0 else None
    if class_logits is not None:  # cross-entropy against a uniform guess, less its floor log K: 0 at best
        terms["class_adversarial"] = -F.log_softmax(class_logits, dim=1).mean(1).mean() - math.log(
            class_logits.shape[1])

    if cfg.specified_consistency > 0:  # a ratio, so shrinking s cannot satisfy it
        within = (s1 - s1p).pow(2).sum(1).mean()
        across = (s1 - s2).pow(2).sum(1).mean()
        terms["specified_spread"] = within / across.clamp_min(1e-8)
    if cfg.class_moments > 0:
        terms["class_moment_leakage"] = discriminator.class_moments.leakage(mu, torch.cat([y1, y1, y2]))
    if cfg.reverse_cycle > 0:
        # Only the encoder learns from it (as in Cycle-VAE): through the decoder too, the pair
        # learns a private code for z that fake images carry and real ones do not.
        _, mu_cycle, _ = vae.encode(torch.sigmoid(fake_prior).detach())
        terms["reverse_cycle"] = (mu_cycle - z_prior).abs().mean()

    pixels = x1[0].numel()
    total = (
        cfg.reconstruction * terms["reconstruction"]
        + kl_weight(cfg, vae.z_dim, pixels) * terms["kl"]
        + cfg.swap * terms["swap"]
        + cfg.adversarial * adversarial_ramp(cfg, step) * terms["adversarial"]
    )
    if "latent_adversarial" in terms:
        total = total + cfg.latent_adversarial * adversarial_ramp(cfg, step) * terms["latent_adversarial"]
    if "class_adversarial" in terms:
        total = total + cfg.class_adversarial * adversarial_ramp(cfg, step) * terms["class_adversarial"]
    if "specified_spread" in terms:
        total = total + cfg.specified_consistency * terms["specified_spread"]
    if "class_moment_leakage" in terms:
        total = total + cfg.class_moments * terms["class_moment_leakage"]
    if "reverse_cycle" in terms:
        total = total + cfg.reverse_cycle * terms["reverse_cycle"]
    fakes = Fakes(from_z1=images[:b].detach(), from_prior=images[b:].detach(),
                  mu1=mu1.detach(), mu1p=mu1p.detach(), mu2=mu2.detach(), y1=y1)
    return total, {k: v.detach() for k, v in terms.items()}, fakes


def discriminator_losses(
    discriminator: torch.nn.Module,
    x2: torch.Tensor,
    x2p: torch.Tensor,
    y2: torch.Tensor,
    fakes: Fakes,
    cfg: LossWeights,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Real (x2, x2') against (x2, Dec(z1, s2)) and (x2, Dec(z_prior, s2)), plus the latent
    critic's same-class guesses when it exists; one backward for the sum."""
    b = x2.shape[0]
    images = torch.cat([x2p, fakes.from_z1, fakes.from_prior])
    code_a, code_b = torch.cat([fakes.mu1, fakes.mu1]), torch.cat([fakes.mu1p, fakes.mu2])
    logits, same_class = discriminator(images, torch.cat([x2, x2, x2]), torch.cat([y2, y2, y2]), code_a, code_b)
    real, fake = logits[:b], logits[b:]
    # One-sided label smoothing: real targets are cfg.real_label (0.95), fakes 0.
    loss_real = F.binary_cross_entropy_with_logits(real, torch.full_like(real, cfg.real_label))
    loss_fake = F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    terms = {
        "disc_real": loss_real.detach(),
        "disc_fake": loss_fake.detach(),
        "disc_acc_real": (real > 0).float().mean().detach(),
        "disc_acc_fake": (fake < 0).float().mean().detach(),
    }
    total = loss_real + loss_fake
    if same_class is not None:
        target = torch.cat([torch.ones(b), torch.zeros(b)]).to(same_class)
        loss_latent = F.binary_cross_entropy_with_logits(same_class, target)
        terms["latent_critic"] = loss_latent.detach()
        terms["latent_critic_acc"] = ((same_class > 0) == (target > 0.5)).float().mean().detach()
        total = total + loss_latent
    class_logits = discriminator.guess_class(fakes.mu1) if cfg.class_adversarial > 0 else None
    if class_logits is not None:
        loss_class = F.cross_entropy(class_logits, fakes.y1)
        terms["class_critic"] = loss_class.detach()
        terms["class_critic_acc"] = (class_logits.argmax(1) == fakes.y1).float().mean().detach()
        total = total + loss_class
    if discriminator.class_moments is not None:  # exact running averages, no gradient
        discriminator.class_moments.update(torch.cat([fakes.mu1, fakes.mu1p, fakes.mu2]), torch.cat([fakes.y1, fakes.y1, y2]))
        terms["class_moment_gap"] = discriminator.class_moments.gap().detach()
    return total, terms
