"""A class critic run the way a probe is fitted (`loss.class_probe` > 0), after Elazar & Goldberg (2018) and
Roy & Boddeti (2019).

A critic trained one step per encoder step is fooled while a probe fitted afterwards still reads the class: the
encoder only has to move away from the critic it sees. This one is run more like the probe that judges the result:

* it learns from a replay buffer of past codes (the batch-standardised mean of z, with their classes), not only
  the current batch, so the encoder cannot escape by hopping between encodings;
* it takes `loss.class_probe_steps` optimizer steps per encoder step on detached codes;
* every `loss.class_probe_refit_every` steps it is re-initialised and fitted afresh on the buffer, like a new
  probe, so a critic stuck in a stale optimum cannot be exploited for long;
* the encoder's loss is the critic's cross-entropy against a uniform guess (max-entropy, not gradient reversal):
  0 when the critic can do no better than chance, and no incentive to flip the class to a wrong one.

Its weights and buffer are module buffers, not parameters: they are saved with the discriminator engine's
checkpoint but stay out of that engine's optimizer (the critic has its own Adam, whose moments restart on resume).
Each rank fits its critic on its own codes, so the ranks hold an ensemble whose gradients the VAE engine averages.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

BUFFER_CODES = 4096  # codes kept for the critic, about 40 steps' worth at 32 pairs a rank
MINIBATCH = 256
REFIT_STEPS = 200
LEARNING_RATE = 1e-3


def standardised(code: torch.Tensor) -> torch.Tensor:
    """The code standardised on its batch, in fp32 (as the probe standardises): shrinking z hides nothing."""
    code = code.float()
    return (code - code.mean(0)) / code.std(0).clamp_min(1e-3)


def _mlp(z_dim: int, num_classes: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(z_dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
                         nn.Linear(hidden, num_classes))


class ProbeCritic(nn.Module):
    def __init__(self, z_dim: int, num_classes: int, steps: int = 1, refit_every: int = 0, hidden: int = 256):
        super().__init__()
        self.num_classes, self.steps, self.refit_every = num_classes, steps, refit_every
        shape = _mlp(z_dim, num_classes, hidden).requires_grad_(False)
        # The architecture only, kept out of the module tree: functional_call always supplies its weights, so no
        # optimizer, freezing or dtype cast of the engine ever sees a parameter of it.
        object.__setattr__(self, "_shape", shape)
        self._names = [name for name, _ in shape.named_parameters()]
        for name, p in shape.named_parameters():
            self.register_buffer("w_" + name.replace(".", "_"), p.detach().clone())
        self.register_buffer("codes", torch.zeros(BUFFER_CODES, z_dim))
        self.register_buffer("labels", torch.zeros(BUFFER_CODES, dtype=torch.long))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))  # codes ever added (fills the ring)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self._live: dict[str, torch.Tensor] | None = None  # fp32 trainable copies of the weights
        self._optimizer: torch.optim.Optimizer | None = None
        self._updates = 0  # host copy of `updates` for the refit schedule (no device read per step)
        self.register_load_state_dict_post_hook(lambda module, keys: module._reloaded())

    def _reloaded(self) -> None:
        self._live, self._optimizer = None, None
        self._updates = int(self.updates)  # once per load

    def _weights(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, "w_" + name.replace(".", "_")) for name in self._names}

    def logits(self, code: torch.Tensor) -> torch.Tensor:
        """Class logits from standardised codes; gradients flow into the code, never into the critic."""
        weights = {name: w.detach().float() for name, w in self._weights().items()}
        return functional_call(self._shape, weights, (code.float(),))

    def encoder_loss(self, mu: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the critic's guess against a uniform one, less its floor log K: 0 at chance."""
        log_p = F.log_softmax(self.logits(standardised(mu)), dim=1)
        return -log_p.mean(1).mean() - math.log(self.num_classes)

    # ------------------------------------------------------------------ the critic's own training

    @torch.no_grad()
    def _remember(self, code: torch.Tensor, labels: torch.Tensor) -> None:
        n = code.shape[0]
        index = (self.seen + torch.arange(n, device=code.device)) % BUFFER_CODES  # on the device: no host read
        self.codes.index_copy_(0, index, code.to(self.codes.dtype))
        self.labels.index_copy_(0, index, labels)
        self.seen += n

    def _start(self, reinitialise: bool) -> None:
        if reinitialise:
            fresh = _mlp(self._shape[0].in_features, self.num_classes, self._shape[0].out_features)
            with torch.no_grad():
                for (name, w), (_, p) in zip(self._weights().items(), fresh.named_parameters()):
                    w.copy_(p)
        self._live = {name: w.detach().float().clone().requires_grad_() for name, w in self._weights().items()}
        self._optimizer = torch.optim.Adam(self._live.values(), lr=LEARNING_RATE)

    def _fit(self, steps: int) -> torch.Tensor:
        filled = self.seen.clamp(max=BUFFER_CODES).float()
        loss = torch.zeros((), device=self.codes.device)
        with torch.enable_grad():
            for _ in range(steps):
                pick = (torch.rand(MINIBATCH, device=self.codes.device) * filled).long()  # no host read
                logits = functional_call(self._shape, self._live, (self.codes[pick].float(),))
                loss = F.cross_entropy(logits, self.labels[pick])
                self._optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self._optimizer.step()
        with torch.no_grad():
            for name, w in self._weights().items():
                w.copy_(self._live[name])
        return loss.detach()

    def update(self, mu: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """After the encoder's step: remember this batch's codes, then train the critic on the buffer (re-initialised
        and refitted on schedule). Returns the critic's figures for the log."""
        code = standardised(mu.detach())
        self._remember(code, labels)
        refit = self.refit_every > 0 and self._updates % self.refit_every == 0
        if self._live is None or refit:
            self._start(reinitialise=refit)
        loss = self._fit(REFIT_STEPS if refit else self.steps)
        self._updates += 1
        self.updates += 1
        with torch.no_grad():
            acc = (self.logits(code).argmax(1) == labels).float().mean()
        return {"class_probe_critic": loss, "class_probe_critic_acc": acc}
