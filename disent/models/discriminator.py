"""Discriminators that tell real same-class images from generated ones.

`pair` (default): judges a pair (reference, image) — real when both are real members of one
class. It needs no labels, only the same-class grouping of the data.
`label`: judges an image together with a class embedding, as in the authors' original code.
Both take (image, reference, label) and use the part their mode needs.
"""
from __future__ import annotations

import torch
import torch.nn as nn

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


def build_discriminator(mode: str, channels: int, image_size: int, num_classes: int, base_channels: int) -> nn.Module:
    if mode == "pair":
        return PairDiscriminator(channels, image_size, base_channels)
    if mode == "label":
        return LabelDiscriminator(channels, image_size, num_classes, base_channels)
    raise ValueError(f"unknown discriminator mode {mode!r}; use 'pair' or 'label' (config key model.discriminator)")
