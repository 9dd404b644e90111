"""disent: distributed training of adversarial disentangling autoencoders."""

__version__ = "0.1.0"
