"""The training objective: the loss of one batch, read top to bottom in :meth:`Objective.__call__`."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .networks import Denoiser
from .noise import NoiseProcess, bcast, empirical_posterior_mean
from .runtime import Runtime
from .weighting import Weighting


@dataclass
class Batch:
    """Training inputs on the device: clean samples, their times, importance weights and noise, and the stable
    target's reference images (None when it is off)."""

    x0: Tensor
    t: Tensor
    importance: Tensor
    eps: Tensor
    reference: Tensor | None = None

    def part(self, index: int, parts: int) -> Batch:
        """Rows [index·n, (index + 1)·n) of ``parts`` equal parts (n = rows / parts); the references are shared."""
        n = len(self.x0) // parts
        rows = slice(index * n, (index + 1) * n)
        return replace(self, x0=self.x0[rows], t=self.t[rows], importance=self.importance[rows], eps=self.eps[rows])


def stable_target(process: NoiseProcess, x_t: Tensor, t: Tensor, x0: Tensor, eps: Tensor,
                  reference: Tensor) -> tuple[Tensor, Tensor]:
    """Xu et al. 2023: x̄0 = E[x0 | x_t] over ``reference`` and the ε̄ with α·x̄0 + σ·ε̄ = x_t, written as
    ε̄ = ε + (α/σ)(x0 − x̄0) so that it is exactly ε where x̄0 = x0 (t near 0, σ tiny)."""
    x0_bar = empirical_posterior_mean(process, x_t, t, reference)
    ratio = bcast(process.alpha(t) / process.sigma(t), x0)
    return x0_bar, eps + ratio * (x0 - x0_bar)


class Objective:
    """The loss of a batch for ``denoiser`` under ``weighting``; the stable target draws its references from
    ``pool`` (the train split on the device) when ``reference_images`` > 0."""

    def __init__(self, denoiser: Denoiser, weighting: Weighting, runtime: Runtime, pool: Tensor | None = None,
                 reference_images: int = 0) -> None:
        self.denoiser, self.weighting, self.runtime = denoiser, weighting, runtime
        self.pool, self.reference_images = pool, reference_images

    def references(self, x0: Tensor, generator: torch.Generator) -> Tensor | None:
        """The stable target's references for a step whose global batch is ``x0``: the whole pool when it has at
        most ``reference_images``, else the batch and that many pool images drawn with ``generator``."""
        n = self.reference_images
        if not n or self.pool is None:
            return None
        if n >= len(self.pool):
            return self.pool
        chosen = torch.randperm(len(self.pool), generator=generator)[:n].to(self.pool.device)
        return torch.cat([x0, self.pool[chosen]])

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        """(objective, loss) per sample: the weighted loss fed back to the timestep sampler and the loss ledger,
        and the loss to minimise (through the learned uncertainty, times the importance weight). ``model`` is the
        denoiser or its DDP wrapper."""
        process, t = self.denoiser.process, batch.t
        x_t = process.add_noise(batch.x0, batch.eps, t)
        with self.runtime.autocast():
            out = model(x_t, t)
        x0, eps = batch.x0, batch.eps
        if batch.reference is not None:
            x0, eps = stable_target(process, x_t, t, x0, eps, batch.reference)
        objective = self.denoiser.prediction.loss(out, x_t, x0, eps, t, self.weighting)
        loss = self.denoiser.uncertainty.adjust(objective, t) * batch.importance
        return objective, loss
