"""Loss weightings: how much each time t counts, expressed as a weight on the x0-space error.

Because a weighting lives in x0 space (a function of t through α, σ and the SNR), it composes with
every prediction type: the trainer multiplies it by the prediction type's ``x0_factor`` (A(t)²).
``none`` keeps the prediction type's own unit-variance loss.
"""

from __future__ import annotations

from torch import Tensor

from .noise import NoiseProcess
from .registry import Registry


class Weighting:
    """Base class: ``x0_weight`` gives the weight per sample, or None for the type's own loss."""

    def x0_weight(self, process: NoiseProcess, t: Tensor) -> Tensor | None:
        raise NotImplementedError


WEIGHTINGS: Registry[Weighting] = Registry("diffusion.weighting")


@WEIGHTINGS.register("none")
class NoWeighting(Weighting):
    """The prediction type's own loss (x0 weight 1/A(t)²)."""

    def x0_weight(self, process: NoiseProcess, t: Tensor) -> Tensor | None:
        return None
