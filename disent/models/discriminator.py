"""Discriminators that tell real same-class images from generated ones.

`pair` (default): judges a pair (reference, image) — real when both are real members of one
class. It needs no labels, only the same-class grouping of the data.
`label`: judges an image together with a class embedding, as in the authors' original code.
Both take (image, reference, label) and use the part their mode needs.

`LatentCritic` (optional, `loss.latent_adversarial` > 0): an extension beyond the paper that
needs only the same-class grouping, like `pair`. It is shown two unspecified codes and guesses
whether they come from images of one class (z1, z1') or from independent images (z1, z2);
the encoder is trained to fool it, which pushes class information out of z.
`ClassCritic` (optional, `loss.class_adversarial` > 0): a label-aware adversary on the mean of z.
It guesses the class from mu; the encoder is trained to leave it at a uniform guess.
`ProbeCritic` (optional, `loss.class_probe` > 0; probe_critic.py): a class critic on the mean of z run the way a
probe is fitted, with its own optimizer and a replay buffer.
`Critics` bundles the image discriminator and the critics into the one module that the
discriminator engine trains, so all share its optimizer and its single backward.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from disent import process_group

from disent.models.loss_weights import LossWeights
from disent.models.probe_critic import ProbeCritic, standardised
from disent.models.vae import DOWNSAMPLINGS, feature_size


def _critic_trunk(in_channels: int, base_channels: int, image_size: int) -> tuple[nn.Sequential, int]:
    # No normalisation: real and fake batches pass separately, and batch statistics would leak between them.
    layers, channels = [], in_channels
    for stage in range(DOWNSAMPLINGS[image_size]):
        width = base_channels * 2**stage
        layers += [nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        channels = width
    return nn.Sequential(*layers, nn.Flatten()), channels * feature_size(image_size) ** 2


class PairDiscriminator(nn.Module):
    def __init__(self, channels: int, image_size: int, base_channels: int = 32):
        super().__init__()
        self.trunk, features = _critic_trunk(2 * channels, base_channels, image_size)
        self.head = nn.Linear(features, 1)

    def forward(self, image: torch.Tensor, reference: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.trunk(torch.cat([reference, image], dim=1))).squeeze(1)


class LabelDiscriminator(nn.Module):
    def __init__(self, channels: int, image_size: int, num_classes: int, base_channels: int = 32):
        super().__init__()
        self.trunk, features = _critic_trunk(channels, base_channels, image_size)
        self.embed = nn.Embedding(num_classes, 64)
        self.head = nn.Sequential(nn.Linear(features + 64, 256), nn.LeakyReLU(0.2), nn.Linear(256, 1))

    def forward(self, image: torch.Tensor, reference: torch.Tensor | None, label: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.trunk(image), self.embed(label)], dim=1)).squeeze(1)


class LatentCritic(nn.Module):
    def __init__(self, z_dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * z_dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1),
        )

    def forward(self, code_a: torch.Tensor, code_b: torch.Tensor) -> torch.Tensor:
        """Logit that code_a and code_b come from same-class images (symmetric in a and b)."""
        return self.net(torch.cat([(code_a - code_b).abs(), code_a * code_b], dim=1)).squeeze(1)


class ClassCritic(nn.Module):
    def __init__(self, z_dim: int, num_classes: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(z_dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        """Class logits from an unspecified code."""
        return self.net(code)


class ClassMomentCritic(nn.Module):
    """A nearest-centroid critic on the mean of z: running per-class means of the standardised code
    and of its square (so class-specific spreads show, not only class-specific positions).

    It is not fitted by gradients but kept as exact running averages (updated in the
    discriminator's step, summed over ranks so every rank holds the same state), so unlike a
    fitted critic it cannot lag behind the encoder it judges.
    """

    def __init__(self, z_dim: int, num_classes: int, momentum: float = 0.02):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("centroids", torch.zeros(num_classes, 2 * z_dim))
        self.register_buffer("frequency", torch.full((num_classes,), 1.0 / num_classes))

    @staticmethod
    def features(code: torch.Tensor) -> torch.Tensor:
        """Standardised on the batch itself (as a probe standardises), so shrinking or
        collapsing the code is no way to hide the class."""
        f = standardised(code)
        return torch.cat([f, f.pow(2) - 1], dim=1)

    def offsets(self) -> torch.Tensor:
        """Each class's centroid less the centroid of all classes: zero when the code is blind to class (in fp32,
        whatever the buffers' dtype)."""
        centroids = self.centroids.float()
        return centroids - (self.frequency.float()[:, None] * centroids).sum(0)

    def gap(self) -> torch.Tensor:
        return (self.frequency * self.offsets().pow(2).sum(1)).sum()

    def _class_sums(self, code: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class sums of the features [classes, 2 z_dim] and per-class counts [classes]."""
        features = self.features(code)
        one_hot = F.one_hot(labels, self.centroids.shape[0]).to(features)
        return (one_hot.t() @ features).float(), one_hot.sum(0).float()

    def leakage(self, code: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """For the encoder: the class offsets this batch would leave if it weighed as much as the
        history, 0 only when both agree that the code is blind to class. Bounded below, so the
        encoder can at most overshoot by one offset, never run away along it."""
        class_sums, counts = self._class_sums(code, labels)
        # Classes absent from the batch weigh 0. No boolean indexing: its data-dependent shape would make
        # the host wait for the GPU every step.
        batch_offsets = class_sums / counts.clamp_min(1)[:, None]
        mixed = 0.5 * self.offsets() + 0.5 * batch_offsets
        return ((counts / counts.sum()) * mixed.pow(2).sum(1)).sum()

    @torch.no_grad()
    def update(self, code: torch.Tensor, labels: torch.Tensor) -> None:
        class_sums, counts = self._class_sums(code, labels)
        k = self.centroids.shape[0]
        summed = all_ranks_sum(torch.cat([class_sums.flatten(), counts]))  # one collective, not two
        class_sums, counts = summed[:-k].view(k, -1), summed[-k:]
        # A class absent from the batch moves by weight 0, i.e. not at all (no boolean indexing: see leakage).
        # The running means are kept in the buffers' own dtype (half when fp16 training casts the module).
        weight = ((counts > 0).float()[:, None] * self.momentum).to(self.centroids.dtype)
        self.centroids.lerp_((class_sums / counts.clamp_min(1)[:, None]).to(self.centroids.dtype), weight)
        self.frequency.lerp_((counts / counts.sum()).to(self.frequency.dtype), self.momentum)


def all_ranks_sum(t: torch.Tensor) -> torch.Tensor:
    if process_group.active():
        torch.distributed.all_reduce(t)
    return t


class Critics(nn.Module):
    """The discriminator engine's module: the image discriminator and the critics the objective's terms ask for
    (TERMS' `critic`, by attribute): the latent critic, the class critic, the class-moment critic and the probe-like
    class critic; an attribute is None when its term is off."""

    def __init__(self, image: nn.Module, latent: LatentCritic | None = None, classes: ClassCritic | None = None,
                 class_moments: ClassMomentCritic | None = None, class_probe: ProbeCritic | None = None):
        super().__init__()
        self.image = image
        self.latent = latent
        self.classes = classes
        self.class_moments = class_moments
        self.class_probe = class_probe

    def forward(
        self, image: torch.Tensor, reference: torch.Tensor, label: torch.Tensor,
        code_a: torch.Tensor | None = None, code_b: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        judged = self.image(image, reference, label)
        same_class = self.latent(code_a, code_b) if self.latent is not None and code_a is not None else None
        return judged, same_class

    def guess_class(self, code: torch.Tensor) -> torch.Tensor | None:
        return self.classes(code) if self.classes is not None else None


def build_discriminator(mode: str, channels: int, image_size: int, num_classes: int, base_channels: int) -> nn.Module:
    if mode == "pair":
        return PairDiscriminator(channels, image_size, base_channels)
    if mode == "label":
        return LabelDiscriminator(channels, image_size, num_classes, base_channels)
    raise ValueError(f"unknown discriminator mode {mode!r}; use 'pair' or 'label' (config key model.discriminator)")


def build_critics(mode: str, channels: int, image_size: int, num_classes: int, base_channels: int, z_dim: int,
                  weights: LossWeights) -> Critics:
    """The image discriminator and the critics of the terms `weights` turns on (TERMS' `critic`)."""
    makers = {
        "latent": lambda: LatentCritic(z_dim),
        "classes": lambda: ClassCritic(z_dim, num_classes),
        "class_moments": lambda: ClassMomentCritic(z_dim, num_classes),
        "class_probe": lambda: ProbeCritic(z_dim, num_classes, weights.class_probe_steps,
                                           weights.class_probe_refit_every),
    }
    image = build_discriminator(mode, channels, image_size, num_classes, base_channels)  # first: the seed's draws
    return Critics(image, **{t.critic: makers[t.critic]() for t in weights.on() if t.critic})


def critics_from_config(cfg) -> Critics:
    """The discriminator engine's module a config describes, with the critics its loss weights ask for."""
    return build_critics(cfg.model.discriminator, cfg.data.channels, cfg.data.image_size, cfg.data.num_classes,
                         cfg.model.disc_channels, cfg.model.z_dim, cfg.loss)
