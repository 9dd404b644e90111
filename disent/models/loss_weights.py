"""The objective's weights and the table of its terms, owned by the model. Plain Python (no torch), so the
config schema and its checks can read them without loading the model."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Term:
    """One term of the VAE's objective, declared once: the objective, the config checks and the critics read this.

    Its weight is the `loss.<name>` field of LossWeights (0 turns it off) and it is logged as `losses/<name>`."""

    name: str
    # The function of disent.models.objective that computes it from a step's codes (StepCodes), called only when
    # the weight is > 0; None for the paper's terms and the latent critic's, which the step computes itself.
    function: str | None = None
    needs_labels: bool = False  # reads the class of x1 (y1), not only the same-class grouping
    ramps: bool = False  # scaled by the adversarial warm-up (loss.adversarial_warmup_steps)
    on_s: bool = True  # belongs to the split into s and z: refused for a plain VAE (model.s_dim 0)
    critic: str | None = None  # the critic (an attribute of Critics) the discriminator engine builds and trains for it


# In the order the total adds them: the paper's, then the extensions.
TERMS: tuple[Term, ...] = (
    Term("reconstruction", on_s=False),
    Term("kl", on_s=False),
    Term("swap"),
    Term("adversarial", ramps=True),
    Term("latent_adversarial", ramps=True, critic="latent"),
    Term("class_adversarial", "class_adversarial", needs_labels=True, ramps=True, critic="classes"),
    Term("specified_consistency", "specified_consistency"),
    Term("class_moments", "class_moments", needs_labels=True, critic="class_moments"),
    Term("reverse_cycle", "reverse_cycle"),
    Term("class_mmd", "class_mmd", needs_labels=True),
    Term("class_probe", "class_probe", needs_labels=True, ramps=True, critic="class_probe"),
    Term("swap_contrast", "swap_contrast", needs_labels=True),
)


@dataclass
class LossWeights:
    """The weight of each term of the objective (`loss.*` in a config; TERMS says what each term is and needs);
    0 turns an extension off."""

    reconstruction: float = 0.5
    swap: float = 1.0
    adversarial: float = 0.01
    kl: float = 0.1
    kl_scale_by_latent_ratio: bool = True  # authors' code: kl * z_dim / pixels
    real_label: float = 0.95  # one-sided label smoothing for real pairs
    reconstruct_x1_prime: bool = False
    reconstruct_x2: bool = False
    adversarial_warmup_steps: int = 0
    # Extension beyond the paper: weight of the latent critic's term (0 = off, as in the paper).
    latent_adversarial: float = 0.0
    # Extension: weight of a label-aware adversary on the mean of z (0 = off): a classifier guesses the
    # class from mu and the encoder is trained to leave it at a uniform guess.
    class_adversarial: float = 0.0
    # Extension (Cycle-VAE's reverse cycle): weight of |f_z(Dec(z_prior, s2)) - z_prior|, trained into
    # the encoder only, so it reads z back the same way whatever the class.
    reverse_cycle: float = 0.0
    # Extension: weight of the class-moment critic's term (0 = off): running per-class means of the
    # standardised mean of z and its square; the encoder is pushed to make them all equal.
    class_moments: float = 0.0
    # Extension: weight of the spread of s within a class relative to its spread across images,
    # |s1 - s1'|^2 / |s1 - s2|^2, so s keeps what a class shares and nothing of the single image.
    specified_consistency: float = 0.0
    # Extension: weight of the class-conditional MMD between each class's mean of z and the pooled one
    # (multi-bandwidth RBF, unbiased; uses the labels): non-adversarial, so nothing is fooled.
    class_mmd: float = 0.0
    # Extension: weight of a class critic run like a probe (disent/models/probe_critic.py; uses the labels): fitted
    # on a replay buffer of past codes, class_probe_steps critic steps per encoder step, re-initialised and refitted
    # every class_probe_refit_every steps (0: never); the encoder is pushed toward its uniform guess.
    class_probe: float = 0.0
    class_probe_steps: int = 4
    class_probe_refit_every: int = 250
    # Extension (DCoDR's contrastive term, uses the labels): the re-encoded swap Dec(z1, s2) must pick out x1's mean
    # of z from among the codes of x1's class, and x1 its swap from among x2's class; same-class negatives, so
    # the class cannot help and a code that carries it pays.
    swap_contrast: float = 0.0

    def on(self) -> list[Term]:
        """The terms whose weight is > 0, in TERMS' order."""
        return [t for t in TERMS if getattr(self, t.name) > 0]
