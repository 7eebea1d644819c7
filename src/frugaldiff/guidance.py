"""Guidance: sharpen a model's x̂0 against a weaker prediction of it, x̂0 = x̂0_guide + w·(x̂0 − x̂0_guide).

Applied to x̂0, so it works with every solver, prediction type and process. The guide is either the model itself
without its label (classifier-free guidance, Ho & Salimans 2022; needs a conditional model trained with label
dropout) or a weaker model, e.g. an earlier checkpoint of the same run (autoguidance, Karras et al. 2024), which
works for unconditional models too. With an interval (Kynkäänniemi et al. 2024) the guide is consulted only for t
in [lo, hi], and elsewhere the model's own x̂0 is used. w = 1 is no guidance, w = 0 the guide alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .networks import Denoiser

#: The values of ``sample.guide``.
GUIDES = ("auto", "cfg", "early", "none")

#: ``train.guide_at = auto``: the share of the budget whose checkpoint guided best on the default run (a
#: conditional model needs a stronger guide than an unconditional one; docs/guidance.md).
GUIDE_AT = {"conditional": 0.8, "unconditional": 0.5}


def guide_share(guide_at: float | str, conditional: bool) -> float:
    """``train.guide_at`` resolved for a conditional or unconditional model."""
    if guide_at == "auto":
        return GUIDE_AT["conditional" if conditional else "unconditional"]
    return float(guide_at)


@dataclass(frozen=True)
class Guidance:
    """A guidance weight, the t interval where it applies, and the guide: ``model`` (a weaker denoiser,
    autoguidance) or None for the model itself without its label (classifier-free)."""

    weight: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)
    model: Denoiser | None = None

    @property
    def active(self) -> bool:
        return self.weight != 1.0


NONE = Guidance()


def guided(denoiser: Denoiser, labels: Tensor | None, guidance: Guidance = NONE) -> Callable[[Tensor, Tensor], Tensor]:
    """x̂0(x_t, t) of ``denoiser`` for ``labels`` (None: unconditional) under ``guidance``; the guide is evaluated only
    where t lies in the interval, and weight 1 never evaluates it."""
    if guidance.active and guidance.model is None and labels is None:
        raise ValueError("classifier-free guidance needs labels; pass them or guide with a weaker model")
    lo, hi = guidance.interval

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        x0 = denoiser.denoise(x, t, labels)
        inside = (t >= lo) & (t <= hi)
        if not guidance.active or not bool(inside.any()):
            return x0
        if guidance.model is not None:
            weak = guidance.model.denoise(x, t, labels)
        else:
            weak = denoiser.denoise(x, t, torch.full_like(labels, denoiser.null_label))
        mixed = torch.lerp(weak, x0, guidance.weight)  # exactly weak at w = 0 and x0 at w = 1
        return mixed if bool(inside.all()) else torch.where(inside.view(-1, *[1] * (x0.dim() - 1)), mixed, x0)

    return denoise
