"""Pruning the quiet units of z at the last step (`model.prune_below_kl` > 0).

A unit whose KL to the prior is small adds next to nothing to the image: the decoder has learnt to ignore it. With a
learned variance its mean still moves a little, and those small moves can follow the class; a probe standardises
every unit and reads them as well as any other (disent/eval/units.py finds this on glyphs). Pruning makes such a unit
the prior itself, mean 0 and variance 1 for every image, which is what the decoder already treated it as.

The KL is averaged over PRUNE_BATCHES batches of the train stream on every rank, summed over the ranks, so every rank
prunes the same units. This is fitted on the train stream after training, like the probes; the mask is a buffer of
the encoder and travels with the checkpoint and the exported model."""
from __future__ import annotations

import logging
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from disent.models.vae import DisentVAE, unit_kl_to_standard_normal

log = logging.getLogger(__name__)

PRUNE_BATCHES = 32  # per rank: with 32 pairs a batch, 1,024 images of x1 a rank


@torch.no_grad()
def unit_kl_on_stream(vae: DisentVAE, batches: Iterator[dict], to_device: Callable[[dict], dict],
                      num_batches: int = PRUNE_BATCHES) -> torch.Tensor:
    """Each unit's KL(q(z_d | x) || N(0, 1)) in nats, averaged over x1 of `num_batches` batches on every rank."""
    total, count = None, None
    for _ in range(num_batches):
        _, mu, logvar = vae.encode(to_device(next(batches))["x1"])
        kl = unit_kl_to_standard_normal(mu.float(), logvar.float()).sum(0)
        n = torch.tensor(float(mu.shape[0]), device=mu.device)
        total, count = (kl, n) if total is None else (total + kl, count + n)
    if dist.is_available() and dist.is_initialized():
        both = torch.cat([total, count.reshape(1)])
        dist.all_reduce(both)
        total, count = both[:-1], both[-1]
    return total / count


def prune_quiet_units(vae: DisentVAE, batches: Iterator[dict], to_device: Callable[[dict], dict],
                      below_kl: float) -> list[int]:
    """Sets the encoder's unit mask to the units whose KL is at least `below_kl` (a pruned unit stays pruned: its KL
    is 0) and returns the pruned units."""
    mask = vae.encoder.unit_mask
    if mask is None:
        raise ValueError("model.prune_below_kl > 0 needs a VAE built with prunes_units=True")
    was_training = vae.training
    vae.eval()
    try:
        kl = unit_kl_on_stream(vae, batches, to_device)
    finally:
        vae.train(was_training)
    keep = (kl >= below_kl).to(mask.dtype)
    mask.copy_(keep)
    pruned = [i for i, k in enumerate(keep.tolist()) if k == 0]
    log.info("pruned %d of %d units of z below %.2f nats: %s (KL per unit: %s)", len(pruned), len(keep), below_kl,
             pruned, " ".join(f"{v:.2f}" for v in kl.tolist()))
    if len(pruned) == len(keep):  # a short or failed run: z now holds nothing of the image
        log.warning("every unit of z was below model.prune_below_kl=%s nats and is pruned: z carries nothing; train "
                    "longer or set model.prune_below_kl=0", below_kl)
    return pruned
