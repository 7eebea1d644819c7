"""Timestep samplers: which times t ∈ [0, 1] each training batch sees, and with what weight.

A sampler returns (t, w): times and per-sample importance weights. A sampler that *keeps the
uniform objective* returns w = p_uniform(t)/p(t), so the weighted loss is an unbiased estimate of
the uniform-t loss; one that *changes the objective* returns w = 1. Samplers may learn from the
per-sample losses passed to :meth:`TimestepSampler.update`, and they carry their own random
generator so that their state (``state_dict``) makes a resumed run identical to an uninterrupted one.
Not to be confused with *solvers* (``frugaldiff.solvers``), which generate images.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .registry import Registry


class TimestepSampler:
    """Base class. ``rank``/``world_size`` and the micro-step let a sampler spread draws over all of them."""

    #: True when the weights make the loss an unbiased estimate of the uniform-t objective.
    keeps_objective = True

    def __init__(self, seed: int = 0, rank: int = 0, world_size: int = 1, accum_steps: int = 1) -> None:
        self.rank, self.world_size, self.accum_steps = rank, world_size, accum_steps
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, n: int, micro_step: int = 0) -> tuple[Tensor, Tensor]:
        """``n`` times in [0, 1] and their weights (float64 tensors on the CPU)."""
        raise NotImplementedError

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Per-sample losses of the last batch; the default ignores them."""

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


TIMESTEP_SAMPLERS: Registry[TimestepSampler] = Registry("diffusion.timestep_sampler")


@TIMESTEP_SAMPLERS.register("uniform")
class UniformSampler(TimestepSampler):
    """t ~ U(0, 1), weight 1: the standard objective."""

    def sample(self, n: int, micro_step: int = 0) -> tuple[Tensor, Tensor]:
        t = torch.rand(n, generator=self.generator, dtype=torch.float64)
        return t, torch.ones_like(t)
