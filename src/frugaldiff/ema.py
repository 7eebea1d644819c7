"""Exponential moving averages of a model's parameters."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Exponential moving average of a model's parameters, with warm-up min(decay, (1+n)/(10+n))."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move the average towards ``model`` after optimizer step ``step``; buffers are copied."""
        decay = min(self.decay, (1 + step) / (10 + step))
        ema_params, params = list(self.model.parameters()), [p.detach() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise ValueError("EMA and model have different parameters")
        torch._foreach_lerp_(ema_params, params, 1 - decay)  # one multi-tensor kernel instead of one per tensor
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)
