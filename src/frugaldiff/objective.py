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
    """Training inputs on the device: clean samples, their times, importance weights and noise, their labels (None:
    unconditional; the null label where dropped), the stable target's reference images and their labels (None
    when it is off) and, for patch training, the crops' coordinates."""

    x0: Tensor
    t: Tensor
    importance: Tensor
    eps: Tensor
    reference: Tensor | None = None
    labels: Tensor | None = None
    reference_labels: Tensor | None = None
    coords: Tensor | None = None  # train.patch: the crops' coordinate channels

    def part(self, index: int, parts: int) -> Batch:
        """Rows [index·n, (index + 1)·n) of ``parts`` equal parts (n = rows / parts); the references are shared."""
        n = len(self.x0) // parts
        rows = slice(index * n, (index + 1) * n)
        labels = None if self.labels is None else self.labels[rows]
        coords = None if self.coords is None else self.coords[rows]
        return replace(self, x0=self.x0[rows], t=self.t[rows], importance=self.importance[rows], eps=self.eps[rows],
                       labels=labels, coords=coords)


def stable_target(process: NoiseProcess, x_t: Tensor, t: Tensor, x0: Tensor, eps: Tensor, reference: Tensor,
                  same_class: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Xu et al. 2023: x̄0 = E[x0 | x_t] over ``reference`` (for conditional training: over the references whose
    class the ``same_class`` mask [B, R] allows) and the ε̄ with α·x̄0 + σ·ε̄ = x_t, written as
    ε̄ = ε + (α/σ)(x0 − x̄0) so that it is exactly ε where x̄0 = x0 (t near 0, σ tiny)."""
    x0_bar = empirical_posterior_mean(process, x_t, t, reference, same_class)
    ratio = bcast(process.alpha(t) / process.sigma(t), x0)
    return x0_bar, eps + ratio * (x0 - x0_bar)


class Objective:
    """The loss of a batch for ``denoiser`` under ``weighting``; the stable target draws its references from
    ``pool`` (the train split on the device) when ``reference_images`` > 0."""

    def __init__(self, denoiser: Denoiser, weighting: Weighting, runtime: Runtime, pool: Tensor | None = None,
                 reference_images: int = 0, pool_labels: Tensor | None = None) -> None:
        self.denoiser, self.weighting, self.runtime = denoiser, weighting, runtime
        self.pool, self.reference_images, self.pool_labels = pool, reference_images, pool_labels

    def references(self, x0: Tensor, labels: Tensor | None, generator: torch.Generator, batch_in_pool: bool = True
                   ) -> tuple[Tensor | None, Tensor | None]:
        """The stable target's references (and their labels, for conditional training) for a step whose global
        batch is ``x0`` with ``labels``: the whole pool when it has at most ``reference_images``, else the batch and
        that many pool images drawn with ``generator``. A batch that is not in the pool as it is (mirrored images)
        joins the whole pool too, so that near t = 0 the target is each image itself."""
        n = self.reference_images
        if not n or self.pool is None:
            return None, None
        if n >= len(self.pool):
            if batch_in_pool:
                return self.pool, self.pool_labels
            both = None if self.pool_labels is None or labels is None else torch.cat([labels, self.pool_labels])
            return torch.cat([x0, self.pool]), both
        chosen = torch.randperm(len(self.pool), generator=generator)[:n].to(self.pool.device)
        pool_labels = None if self.pool_labels is None or labels is None else \
            torch.cat([labels, self.pool_labels[chosen]])
        return torch.cat([x0, self.pool[chosen]]), pool_labels

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        """(objective, loss) per sample: the weighted loss fed back to the timestep sampler and the loss ledger,
        and the loss to minimise (through the learned uncertainty, times the importance weight). ``model`` is the
        denoiser or its DDP wrapper."""
        process, t = self.denoiser.process, batch.t
        x_t = process.add_noise(batch.x0, batch.eps, t)
        with self.runtime.autocast():
            out = model(x_t, t, batch.labels) if batch.coords is None else model(x_t, t, batch.labels, batch.coords)
        x0, eps = batch.x0, batch.eps
        if batch.reference is not None:
            x0, eps = stable_target(process, x_t, t, x0, eps, batch.reference, self._same_class(batch))
        objective = self.denoiser.prediction.loss(out, x_t, x0, eps, t, self.weighting)
        loss = self.denoiser.uncertainty.adjust(objective, t) * batch.importance
        return objective, loss

    def _same_class(self, batch: Batch) -> Tensor | None:
        """[B, R]: which references share each sample's class (every one for the null label); None: all."""
        if batch.labels is None or batch.reference_labels is None:
            return None
        null = (batch.labels == self.denoiser.null_label)[:, None]
        return null | (batch.labels[:, None] == batch.reference_labels[None, :])
