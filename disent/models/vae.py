"""The disentangling autoencoder of Mathieu et al. (NIPS 2016).

An image x is split into a specified code s = f_s(x) (deterministic, carries the class)
and an unspecified code z ~ N(mu, sigma) with (mu, log sigma^2) = f_z(x, s) (everything
else). The decoder renders Dec(z, s). Conv stacks are sized from the image size:
28 -> 14 -> 7, 32 -> 16 -> 8 -> 4, 64 -> 32 -> 16 -> 8 -> 4.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# image size -> number of stride-2 stages; chosen so the smallest feature map is 4x4 or 7x7
DOWNSAMPLINGS = {28: 2, 32: 3, 64: 4}


def feature_size(image_size: int) -> int:
    if image_size not in DOWNSAMPLINGS:
        raise ValueError(f"image size {image_size} is not supported; use one of {sorted(DOWNSAMPLINGS)}")
    return image_size // 2 ** DOWNSAMPLINGS[image_size]


def conv_trunk(in_channels: int, base_channels: int, image_size: int) -> tuple[nn.Sequential, int]:
    """Stride-2 convs doubling the width each stage; returns the trunk and its flattened size."""
    layers, channels = [], in_channels
    for stage in range(DOWNSAMPLINGS[image_size]):
        width = base_channels * 2**stage
        layers += [nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.GroupNorm(8, width), nn.SiLU()]
        channels = width
    return nn.Sequential(*layers, nn.Flatten()), channels * feature_size(image_size) ** 2


class Encoder(nn.Module):
    """x -> (s, mu, logvar). f_s and f_z share the conv trunk; f_z also sees s.

    posterior_sigma > 0 fixes sigma for every unit (LORD's fixed-variance posterior): f_z gives mu only and logvar is
    the constant log sigma^2. z_sees_s=False gives f_z the trunk's features alone (f_z(x) instead of f_z(x, s)):
    s carries the class, and any weight from s into mu is a direct path for it.

    prunes_units gives it a mask over the units of z (a buffer, all ones until disent.train.pruning sets it): a pruned
    unit's mean is 0 and its variance 1 for every image, so it is the prior itself and holds nothing a probe can read.
    """

    def __init__(self, channels: int, image_size: int, s_dim: int, z_dim: int, base_channels: int,
                 posterior_sigma: float = 0.0, z_sees_s: bool = True, prunes_units: bool = False):
        super().__init__()
        self.register_buffer("unit_mask", torch.ones(z_dim) if prunes_units else None)
        self.trunk, features = conv_trunk(channels, base_channels, image_size)
        # s_dim 0 is a plain VAE (the reference a leakage figure is read against): s is an empty code
        self.f_s = nn.Sequential(nn.Linear(features, 256), nn.SiLU(), nn.Linear(256, s_dim)) if s_dim else None
        self.fixed_logvar = 2.0 * math.log(posterior_sigma) if posterior_sigma > 0 else None
        outputs = z_dim if self.fixed_logvar is not None else 2 * z_dim
        self.z_sees_s = z_sees_s
        self.f_z = nn.Sequential(nn.Linear(features + (s_dim if z_sees_s else 0), 256), nn.SiLU(), nn.Linear(256, outputs))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Weights saved without pruning have no mask: none of their units is pruned.
        if self.unit_mask is not None and prefix + "unit_mask" not in state_dict:
            state_dict[prefix + "unit_mask"] = torch.ones_like(self.unit_mask)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        s = self.f_s(h) if self.f_s is not None else h.new_zeros(h.shape[0], 0)
        out = self.f_z(torch.cat([h, s], dim=1) if self.z_sees_s else h)
        if self.fixed_logvar is not None:
            mu, logvar = out, torch.full_like(out, self.fixed_logvar)
        else:
            mu, logvar = out.chunk(2, dim=1)
            logvar = logvar.clamp(-10.0, 10.0)
        if self.unit_mask is not None:
            mask = self.unit_mask.to(mu.dtype)
            mu, logvar = mu * mask, logvar * mask
        return s, mu, logvar


def upsampling_layer(in_channels: int, out_channels: int, kind: str) -> nn.Module:
    """Doubles the side: a 4x4 stride-2 transposed conv, or nearest-neighbour 2x then a 3x3 conv
    (no overlap pattern, so no checkerboard)."""
    if kind == "transposed":
        return nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1)
    if kind == "upsample":
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(in_channels, out_channels, 3, padding=1))
    raise ValueError(f"unknown decoder kind {kind!r}; use 'transposed' or 'upsample' (config key model.decoder)")


class Decoder(nn.Module):
    """(z, s) -> image logits, mirroring the encoder's trunk with upsampling stages."""

    def __init__(self, channels: int, image_size: int, s_dim: int, z_dim: int, base_channels: int,
                 kind: str = "transposed"):
        super().__init__()
        stages = DOWNSAMPLINGS[image_size]
        self.width = base_channels * 2 ** (stages - 1)
        self.side = feature_size(image_size)
        self.project = nn.Sequential(nn.Linear(z_dim + s_dim, self.width * self.side**2), nn.SiLU())
        layers, width = [], self.width
        for stage in reversed(range(stages - 1)):
            out = base_channels * 2**stage
            layers += [upsampling_layer(width, out, kind), nn.GroupNorm(8, out), nn.SiLU()]
            width = out
        layers.append(upsampling_layer(width, channels, kind))
        self.upsample = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        h = self.project(torch.cat([z, s], dim=1)).view(-1, self.width, self.side, self.side)
        return self.upsample(h)


class DisentVAE(nn.Module):
    def __init__(self, channels: int, image_size: int, s_dim: int, z_dim: int, base_channels: int = 32,
                 decoder: str = "transposed", class_channel_classes: int = 0, posterior_sigma: float = 0.0,
                 z_sees_s: bool = True, prunes_units: bool = False):
        super().__init__()
        self.z_dim = z_dim
        self.encoder = Encoder(channels, image_size, s_dim, z_dim, base_channels, posterior_sigma, z_sees_s,
                               prunes_units)
        self.decoder = Decoder(channels, image_size, s_dim, z_dim, base_channels, decoder)
        # LORD's class codes c_y (model.class_channel): what the decoder sees in place of s while training
        self.class_codes = nn.Embedding(class_channel_classes, s_dim) if class_channel_classes else None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encoder(x)

    @staticmethod
    def sample(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """The reparameterisation trick: z = mu + sigma * eps."""
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def decode(self, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Image logits; torch.sigmoid gives pixels in [0, 1]."""
        return self.decoder(z, s)

    def prior(self, n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(n, self.z_dim, device=like.device, dtype=like.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, mu, logvar = self.encode(x)
        return self.decode(self.sample(mu, logvar), s)


def unit_kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_d, sigma_d) || N(0, 1)) of each code and unit ([batch, z_dim])."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, I)) summed over z, averaged over the batch."""
    return unit_kl_to_standard_normal(mu, logvar).sum(dim=1).mean()


def reconstruction_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel binary cross-entropy against targets in [0, 1], averaged over pixels and batch; in fp32 whatever
    the precision of the logits (fp16 or bf16 training)."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def vae_from_config(cfg) -> DisentVAE:
    """The VAE a config describes: image shape from cfg.data, sizes and decoder from cfg.model."""
    m = cfg.model
    return DisentVAE(cfg.data.channels, cfg.data.image_size, m.s_dim, m.z_dim, m.base_channels, m.decoder,
                     class_channel_classes=cfg.data.num_classes if m.class_channel else 0,
                     posterior_sigma=m.posterior_sigma, z_sees_s=m.z_sees_s, prunes_units=m.prune_below_kl > 0)


def float32_copy(vae: nn.Module, cfg, device: torch.device | str) -> DisentVAE:
    """A fresh, uncompiled float32 VAE on `device` holding `vae`'s weights (fp16 training keeps them in half; the
    evaluation and the logged model read them in full). `vae` itself is left as it is."""
    with torch.device(device):  # built where it will live: no CPU copy first
        copy = vae_from_config(cfg)
    copy.load_state_dict(vae.state_dict())  # casts each tensor to the copy's float32 and device
    return copy
