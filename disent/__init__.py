"""disent: distributed training of adversarial disentangling autoencoders."""

__version__ = "0.1.0"


def load(source, device=None):
    """A trained model: ``disent.load(run_dir | checkpoint | exported folder | "runs:/ID/model" |
    "models:/NAME/latest")`` -> :class:`disent.api.Model` (encode, decode, swap, config)."""
    from disent.api import load as load_model  # lazy: `import disent` (the launcher's too) must not load torch

    return load_model(source, device)
