"""The training objective of Mathieu et al. (2016), one step of it.

With x1, x1' of one class and an independent same-class pair x2, x2':
  1. reconstruction  Dec(z1, s1) -> x1, plus KL(q(z1|x1, s1) || N(0, I))
  2. swap            Dec(z1, s1') -> x1: s must carry what x1 and x1' share (the class)
  3. adversarial     Dec(z1, s2) and Dec(z_prior, s2) must pass as real members of x2's class,
                     so z1 cannot smuggle x1's class into the image.
The discriminator is trained to tell the real (x2, x2') from those fakes.

Extensions beyond the paper follow the paper's terms, each named as its `loss.*` weight and off at 0
(the paper's objective): `latent_adversarial`, `class_adversarial`, `specified_consistency`,
`class_moments`, `reverse_cycle`, `class_mmd`, `class_probe`, `swap_contrast`. Each is one function below with its docstring,
declared once in `disent.models.loss_weights.TERMS`. `Objective` holds one run's weights and runs the step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from disent.models.loss_weights import TERMS, LossWeights
from disent.models.probe_critic import standardised
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


# --------------------------------------------------------------------------- weights


def kl_weight(cfg: LossWeights, z_dim: int, pixels: int) -> float:
    """Per-pixel reconstruction pairs with a KL scaled by z_dim / pixels (the authors' ratio)."""
    return cfg.kl * (z_dim / pixels if cfg.kl_scale_by_latent_ratio else 1.0)


def adversarial_ramp(cfg: LossWeights, step: int) -> float:
    """Optional linear warm-up of the adversarial weight over the first steps."""
    if cfg.adversarial_warmup_steps <= 0:
        return 1.0
    return min(1.0, step / cfg.adversarial_warmup_steps)


def weighted_sum(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """sum_k w_k * term_k over the terms present, added in the order of `weights`."""
    total = None
    for name, weight in weights.items():
        if name in terms:
            total = weight * terms[name] if total is None else total + weight * terms[name]
    return total


# --------------------------------------------------------------------------- the batching trick


def batched(fn, *calls: tuple[torch.Tensor, ...]):
    """The batching trick: `fn` once over several same-sized calls, each of its arguments concatenated
    along the batch (one pass through every layer instead of one per call). Returns fn's output(s)
    over the whole batch; call i's share is `rows(out, i, b)` or `out.split(b)[i]`."""
    return fn(*(torch.cat(args) for args in zip(*calls)))


def rows(t: torch.Tensor, i: int, b: int) -> torch.Tensor:
    """Call i's share of a batched output of b rows per call (a view, so gradients flow back).

    Taken afresh at each use, not split once: one shared view of mu[b:2b] would change the order
    in which autograd sums its gradients, and so their last bits."""
    return t[i * b : (i + 1) * b]


# --------------------------------------------------------------------------- the paper's terms


def reconstruction_term(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """1. Dec(z1, s1) -> x1 (and, optionally, the same for x1' and x2)."""
    return reconstruction_loss(logits, x)


def resampled_reconstruction_term(vae: DisentVAE, mu: torch.Tensor, logvar: torch.Tensor, s: torch.Tensor,
                                  x: torch.Tensor) -> torch.Tensor:
    """Dec(z, s) -> x for x1' or x2 (loss.reconstruct_*): z ~ q(z | x) drawn now, its own decoder pass."""
    return reconstruction_term(vae.decode(vae.sample(mu, logvar), s), x)


def kl_term(mu1: torch.Tensor, logvar1: torch.Tensor) -> torch.Tensor:
    """1. KL(q(z1 | x1, s1) || N(0, I)). With a fixed sigma (model.posterior_sigma) it is 0.5 * |mu1|^2 plus a
    constant: an L2 penalty on mu, LORD's activation penalty."""
    return kl_to_standard_normal(mu1, logvar1)


def swap_term(swap_logits: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """2. Dec(z1, s1') -> x1: s must carry what x1 and x1' share (the class)."""
    return reconstruction_loss(swap_logits, x1)


def class_code_term(s: torch.Tensor, class_codes: torch.Tensor) -> torch.Tensor:
    """model.class_channel: |s - c_y|^2 per dimension, with c_y fixed (it is the decoder's): s learns to stand in
    for the class code it replaces while training, so Dec(z, s) works at test time (OverLORD's distillation)."""
    return (s.float() - class_codes.detach().float()).pow(2).mean()


def adversarial_terms(discriminator: torch.nn.Module, images: torch.Tensor, x2: torch.Tensor, y2: torch.Tensor,
                      mu1: torch.Tensor, mu1p: torch.Tensor) -> dict[str, torch.Tensor]:
    """3. Dec(z1, s2) and Dec(z_prior, s2) (`images`) must pass as real members of x2's class. The same call
    of the critics gives the latent critic's guess (extension `latent_adversarial`): (mu1, mu1') must
    also look like the codes of independent images."""
    judged, same_class = discriminator(images, torch.cat([x2, x2]), torch.cat([y2, y2]), mu1, mu1p)
    judged = judged.float()  # fp32 losses whatever the precision of the logits
    terms = {"adversarial": F.binary_cross_entropy_with_logits(judged, torch.ones_like(judged))}
    if same_class is not None:
        same_class = same_class.float()
        terms["latent_adversarial"] = F.binary_cross_entropy_with_logits(same_class, torch.zeros_like(same_class))
    return terms


# --------------------------------------------------------------------------- the extensions


@dataclass
class StepCodes:
    """What the extensions read from one VAE step: the codes of x1, x1', x2 (rows of b each), z_prior
    and Dec(z_prior, s2), and the classes of x1 and x2."""

    s: torch.Tensor
    mu: torch.Tensor
    z_prior: torch.Tensor
    fake_prior: torch.Tensor
    fake_z1: torch.Tensor  # Dec(z1, s2): x1's style in x2's class (logits)
    y1: torch.Tensor | None
    y2: torch.Tensor
    b: int
    num_classes: int  # the data's classes, for the terms that read labels


def class_adversarial(vae: DisentVAE, discriminator: torch.nn.Module, c: StepCodes) -> torch.Tensor:
    """The class critic's guess of x1's class from mu1, held to uniform: cross-entropy against a uniform
    guess less its floor log K, so 0 at best (uses the labels)."""
    class_logits = discriminator.guess_class(rows(c.mu, 0, c.b)).float()
    return -F.log_softmax(class_logits, dim=1).mean(1).mean() - math.log(class_logits.shape[1])


def specified_consistency(vae: DisentVAE, discriminator: torch.nn.Module, c: StepCodes) -> torch.Tensor:
    """|s1 - s1'|^2 / |s1 - s2|^2: s keeps what a class shares and nothing particular to one image; a ratio,
    so shrinking s cannot satisfy it (uses only the grouping)."""
    s1, s1p, s2 = rows(c.s, 0, c.b), rows(c.s, 1, c.b), rows(c.s, 2, c.b)
    within = (s1 - s1p).pow(2).sum(1).mean()
    across = (s1 - s2).pow(2).sum(1).mean()
    return within / across.clamp_min(1e-8)


def class_moments(vae: DisentVAE, discriminator: torch.nn.Module, c: StepCodes) -> torch.Tensor:
    """The class-moment critic's leakage of the class into the mean of z (of x1, x1', x2): its running
    per-class means of the standardised code and of its square should all be equal (uses the labels)."""
    return discriminator.class_moments.leakage(c.mu, torch.cat([c.y1, c.y1, c.y2]))


def reverse_cycle(vae: DisentVAE, discriminator: torch.nn.Module, c: StepCodes) -> torch.Tensor:
    """Cycle-VAE's reverse cycle, |f_z(Dec(z_prior, s2)) - z_prior|. Only the encoder learns from it: through
    the decoder too, the pair learns a private code for z that fake images carry and real ones do not."""
    # In float32 like the real images: a bf16 input (the decoder's output under autocast) would be one more variant
    # of a compiled encoder.
    _, mu_cycle, _ = vae.encode(torch.sigmoid(c.fake_prior.float()).detach())
    return (mu_cycle - c.z_prior).abs().mean()


MMD_BANDWIDTHS = (0.25, 1.0, 4.0)  # RBF widths, in units of the standardised code's mean squared distance


def class_mmd_per_class(mu: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Unbiased multi-bandwidth MMD^2 between each class's codes and the pooled codes, per class ([classes];
    0 for a class with fewer than two codes). Expected 0 when the code's distribution does not depend on the
    class; no boolean indexing (one-hot weights), so no host sync."""
    f = standardised(mu)  # shrinking the code is no way to hide the class
    d2 = torch.cdist(f, f).pow(2)
    scale = d2.mean().detach().clamp_min(1e-6)
    n = f.shape[0]
    k0 = sum(torch.exp(-d2 / (w * scale)) for w in MMD_BANDWIDTHS) * (1 - torch.eye(n, device=f.device))
    onehot = F.one_hot(labels, num_classes).float()
    counts = onehot.sum(0)
    w = onehot / counts.clamp_min(1)
    u = torch.full((n,), 1.0 / n, device=f.device)
    within = (w * (k0 @ w)).sum(0) * counts / (counts - 1).clamp_min(1)
    across = (w.t() @ (k0 @ u)) * n / (n - 1)
    pooled = (u @ k0 @ u) * n / (n - 1)
    return torch.where(counts >= 2, within - 2 * across + pooled, torch.zeros_like(counts))


def class_mmd(vae: DisentVAE, discriminator: torch.nn.Module, c: StepCodes) -> torch.Tensor:
    """Class-conditional MMD on the mean of z (as in the VFAE): each class's mu of x1, x1', x2 against the pooled
    mu, weighted by the class's share of the batch. Non-adversarial, so no critic can be fooled (uses the
    labels)."""
    labels = torch.cat([c.y1, c.y1, c.y2])
    per_class = class_mmd_per_class(c.mu, labels, c.num_classes)
    share = F.one_hot(labels, c.num_classes).float().mean(0)
    return (share * per_class).sum()


def class_probe(vae: DisentVAE, discriminator: torch.nn.Module, c: StepCodes) -> torch.Tensor:
    """The probe-like critic's guess of the class from the mean of z (of x1, x1', x2), held to uniform: 0 when it
    can do no better than chance. The critic learns in the discriminator's step (uses the labels there)."""
    return discriminator.class_probe.encoder_loss(c.mu)


CONTRAST_TEMPERATURE = 0.2  # DCoDR's tau


def same_class_info_nce(anchor: torch.Tensor, positive: torch.Tensor, bank: torch.Tensor, negative: torch.Tensor,
                        temperature: float = CONTRAST_TEMPERATURE) -> torch.Tensor:
    """InfoNCE of each anchor row against its positive row, with the rows of `bank` that `negative` marks
    ([anchors, bank] bool) as its negatives; all rows unit-normalised. Masked, not indexed: no host sync."""
    pos = (anchor * positive).sum(1, keepdim=True) / temperature
    neg = torch.where(negative, anchor @ bank.t() / temperature, float("-inf"))
    return (torch.logsumexp(torch.cat([pos, neg], 1), 1) - pos.squeeze(1)).mean()


def swap_contrast(vae: DisentVAE, discriminator: torch.nn.Module, c: StepCodes) -> torch.Tensor:
    """DCoDR's contrastive term (Kahana & Hoshen, 2022) with the swap as its augmentation: x1 rendered in x2's class,
    Dec(z1, s2), re-encoded, must give back x1's code mu1 from among the codes of other images of x1's class, and
    the other way round from among the codes of x2's class. The negatives share the anchor's class, so the class
    tells them apart no better than chance, while the positive crosses classes: a code that carries the class pays
    for it, and a code that drops the image cannot find its positive (z is kept). Compared on the batch-standardised,
    unit-normalised mean of z (what the probe reads; shrinking z hides nothing). Only the encoder learns from it:
    the image is detached, as for the reverse cycle (uses the labels)."""
    b = c.b
    _, mu_swapped, _ = vae.encode(torch.sigmoid(c.fake_z1.float()).detach())
    codes = F.normalize(standardised(torch.cat([c.mu, mu_swapped])), dim=1)
    real, mu1, swapped = codes[: 3 * b], codes[:b], codes[3 * b :]
    labels = torch.cat([c.y1, c.y1, c.y2])
    rows_ = torch.arange(3 * b, device=codes.device)
    not_x1 = rows_[None, :] != rows_[:b, None]  # x1 is the positive, never a negative
    from_x1 = same_class_info_nce(mu1, swapped, real, (labels[None, :] == c.y1[:, None]) & not_x1)
    from_swap = same_class_info_nce(swapped, mu1, real, (labels[None, :] == c.y2[:, None]) & not_x1)
    return (from_x1 + from_swap) / 2


# --------------------------------------------------------------------------- the discriminator's losses


def real_vs_fake_losses(real: torch.Tensor, fake: torch.Tensor, real_label: float) -> tuple[torch.Tensor, dict]:
    """The pair discriminator: real (x2, x2') against the fakes. One-sided label smoothing: real
    targets are `real_label` (0.95), fakes 0. The logits may come out of bf16/fp16 autocast; the losses
    are taken in fp32 (in bf16 the 0.95 target would be 0.949, and the loss and its gradient bf16)."""
    real, fake = real.float(), fake.float()
    loss_real = F.binary_cross_entropy_with_logits(real, torch.full_like(real, real_label))
    loss_fake = F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    terms = {
        "disc_real": loss_real.detach(),
        "disc_fake": loss_fake.detach(),
        "disc_acc_real": (real > 0).float().mean().detach(),
        "disc_acc_fake": (fake < 0).float().mean().detach(),
    }
    return loss_real + loss_fake, terms


def latent_critic_loss(same_class: torch.Tensor, b: int) -> tuple[torch.Tensor, dict]:
    """The latent critic: (mu1, mu1') are one class (1), (mu1, mu2) independent images (0)."""
    same_class = same_class.float()
    target = (torch.arange(2 * b, device=same_class.device) < b).float()  # made on the device: no host copy
    loss = F.binary_cross_entropy_with_logits(same_class, target)
    acc = ((same_class > 0) == (target > 0.5)).float().mean().detach()
    return loss, {"latent_critic": loss.detach(), "latent_critic_acc": acc}


def class_critic_loss(discriminator: torch.nn.Module, mu1: torch.Tensor, y1: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The class critic: x1's class from mu1."""
    class_logits = discriminator.guess_class(mu1).float()
    loss = F.cross_entropy(class_logits, y1)
    acc = (class_logits.argmax(1) == y1).float().mean().detach()
    return loss, {"class_critic": loss.detach(), "class_critic_acc": acc}


# --------------------------------------------------------------------------- one run's objective


class Objective:
    """One run's objective: its weights (the config's `loss` section), held once, and the function of each
    extension they turn on (TERMS names it)."""

    def __init__(self, weights: LossWeights, num_classes: int):
        self.weights = weights
        self.num_classes = num_classes
        on = weights.on()
        self.extensions: dict[str, Callable[[DisentVAE, torch.nn.Module, StepCodes], torch.Tensor]] = {
            t.name: globals()[t.function] for t in on if t.function}  # TERMS names functions of this module
        self.needs_labels = [t.name for t in on if t.needs_labels]

    def term_weights(self, z_dim: int, pixels: int, step: int) -> dict[str, float]:
        """The weight of each VAE term, in the order the total adds them (TERMS'); the ramped ones follow the
        adversarial warm-up."""
        ramp = adversarial_ramp(self.weights, step)
        weights = {t.name: getattr(self.weights, t.name) * (ramp if t.ramps else 1.0) for t in TERMS}
        weights["kl"] = kl_weight(self.weights, z_dim, pixels)
        weights["class_code"] = 1.0  # model.class_channel's distillation of s toward c_y (only with the channel)
        return weights

    def vae_losses(
        self,
        vae: DisentVAE,
        discriminator: torch.nn.Module,
        x1: torch.Tensor,
        x1p: torch.Tensor,
        x2: torch.Tensor,
        x2p: torch.Tensor,
        y2: torch.Tensor,
        step: int,
        y1: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], Fakes]:
        """The VAE's total loss, its terms (detached), and the fakes for the discriminator.

        `discriminator` is the bare `Critics` module with frozen parameters: gradients flow through
        it into the VAE but never into its own weights. x2' is the discriminator's alone.
        """
        cfg = self.weights
        if self.needs_labels and y1 is None:
            raise ValueError(f"loss.{self.needs_labels[0]} > 0 needs the class of x1 (y1)")
        if vae.class_codes is not None and y1 is None:
            raise ValueError("model.class_channel needs the class of x1 (y1)")
        b = x1.shape[0]
        s, mu, logvar = batched(vae.encode, (x1,), (x1p,), (x2,))  # one encoder pass
        s1, s1p, s2 = rows(s, 0, b), rows(s, 1, b), rows(s, 2, b)
        mu1, logvar1 = rows(mu, 0, b), rows(logvar, 0, b)
        z1 = vae.sample(mu1, logvar1)
        z_prior = vae.prior(b, like=z1)
        terms = {}
        if vae.class_codes is not None:  # model.class_channel: the decoder's class comes from c_y, s learns to stand in
            c1, c2 = vae.class_codes(y1).to(s.dtype), vae.class_codes(y2).to(s.dtype)
            terms["class_code"] = class_code_term(s, torch.cat([c1, c1, c2]))
            s1, s2 = c1, c2
        # One decoder pass: Dec(z1, s1), Dec(z1, s1'), Dec(z1, s2), Dec(z_prior, s2).
        recon1, swap1, fake_z1, fake_prior = batched(vae.decode, (z1, s1), (z1, s1p), (z1, s2), (z_prior, s2)).split(b)

        terms["reconstruction"] = reconstruction_term(recon1, x1)
        if cfg.reconstruct_x1_prime:
            terms["reconstruction"] = terms["reconstruction"] + resampled_reconstruction_term(
                vae, rows(mu, 1, b), rows(logvar, 1, b), s1p, x1p)
        if cfg.reconstruct_x2:
            terms["reconstruction"] = terms["reconstruction"] + resampled_reconstruction_term(
                vae, rows(mu, 2, b), rows(logvar, 2, b), s2, x2)
        terms["kl"] = kl_term(mu1, logvar1)
        terms["swap"] = swap_term(swap1, x1)
        images = torch.sigmoid(torch.cat([fake_z1, fake_prior]))
        mu1p, mu2 = rows(mu, 1, b), rows(mu, 2, b)
        terms.update(adversarial_terms(discriminator, images, x2, y2, mu1, mu1p))
        codes = StepCodes(s=s, mu=mu, z_prior=z_prior, fake_prior=fake_prior, fake_z1=fake_z1, y1=y1, y2=y2, b=b,
                          num_classes=self.num_classes)
        terms.update({name: term(vae, discriminator, codes) for name, term in self.extensions.items()})

        total = weighted_sum(terms, self.term_weights(vae.z_dim, x1[0].numel(), step))
        fakes = Fakes(from_z1=images[:b].detach(), from_prior=images[b:].detach(),
                      mu1=mu1.detach(), mu1p=mu1p.detach(), mu2=mu2.detach(), y1=y1)
        return total, {k: v.detach() for k, v in terms.items()}, fakes

    def discriminator_losses(
        self,
        discriminator: torch.nn.Module,
        x2: torch.Tensor,
        x2p: torch.Tensor,
        y2: torch.Tensor,
        fakes: Fakes,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Real (x2, x2') against (x2, Dec(z1, s2)) and (x2, Dec(z_prior, s2)), plus the critics the weights
        turned on (each learns from the codes of this step's fakes); one backward for the sum."""
        b = x2.shape[0]
        images = torch.cat([x2p, fakes.from_z1, fakes.from_prior])
        code_a, code_b = torch.cat([fakes.mu1, fakes.mu1]), torch.cat([fakes.mu1p, fakes.mu2])
        logits, same_class = discriminator(images, torch.cat([x2, x2, x2]), torch.cat([y2, y2, y2]), code_a, code_b)
        total, terms = real_vs_fake_losses(logits[:b], logits[b:], self.weights.real_label)
        if same_class is not None:
            loss, critic_terms = latent_critic_loss(same_class, b)
            total = total + loss
            terms.update(critic_terms)
        if discriminator.classes is not None:
            loss, critic_terms = class_critic_loss(discriminator, fakes.mu1, fakes.y1)
            total = total + loss
            terms.update(critic_terms)
        if discriminator.class_moments is not None:  # exact running averages, no gradient
            discriminator.class_moments.update(torch.cat([fakes.mu1, fakes.mu1p, fakes.mu2]),
                                               torch.cat([fakes.y1, fakes.y1, y2]))
            terms["class_moment_gap"] = discriminator.class_moments.gap().detach()
        if discriminator.class_probe is not None:  # its own optimizer, on detached codes
            terms.update(discriminator.class_probe.update(torch.cat([fakes.mu1, fakes.mu1p, fakes.mu2]),
                                                          torch.cat([fakes.y1, fakes.y1, y2])))
        return total, terms
