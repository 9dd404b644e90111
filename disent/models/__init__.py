from disent.models.discriminator import (
    Critics, LabelDiscriminator, LatentCritic, PairDiscriminator, build_critics, build_discriminator,
)
from disent.models.vae import DisentVAE

__all__ = [
    "DisentVAE", "PairDiscriminator", "LabelDiscriminator", "LatentCritic", "Critics", "build_discriminator",
    "build_critics",
]
