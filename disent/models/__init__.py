from disent.models.discriminator import LabelDiscriminator, PairDiscriminator, build_discriminator
from disent.models.vae import DisentVAE

__all__ = ["DisentVAE", "PairDiscriminator", "LabelDiscriminator", "build_discriminator"]
