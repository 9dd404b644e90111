from disent.models.discriminator import (
    Critics, LabelDiscriminator, LatentCritic, PairDiscriminator, build_critics, build_discriminator,
)
from disent.models.vae import DisentVAE

__all__ = [
    "DisentVAE", "PairDiscriminator", "LabelDiscriminator", "LatentCritic", "Critics", "build_discriminator",
    "build_critics", "vae_from_config", "critics_from_config",
]


def vae_from_config(cfg) -> DisentVAE:
    """The VAE a config describes: image shape from cfg.data, sizes and decoder from cfg.model."""
    m = cfg.model
    return DisentVAE(cfg.data.channels, cfg.data.image_size, m.s_dim, m.z_dim, m.base_channels, m.decoder)


def critics_from_config(cfg) -> Critics:
    """The discriminator engine's module a config describes, with the critics its loss weights ask for."""
    return build_critics(
        cfg.model.discriminator, cfg.data.channels, cfg.data.image_size, cfg.data.num_classes, cfg.model.disc_channels,
        cfg.model.z_dim, latent_critic=cfg.loss.latent_adversarial > 0, class_critic=cfg.loss.class_adversarial > 0,
        class_moment_critic=cfg.loss.class_moments > 0,
    )
