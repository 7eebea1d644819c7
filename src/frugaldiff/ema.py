"""Moving averages of a model's parameters: the classic EMA with warm-up, and EDM2's power-function EMAs with the
post-hoc reconstruction of any EMA length from their snapshots."""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import FrugalError


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


# ---------------------------------------------------------------------------------------------------------
# Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models")
#
# A power-function EMA of exponent γ holds, at training time T (images seen), the average of the weights θ(τ)
# over τ ∈ [0, T] with density p(τ) = (γ + 1)·τ^γ / T^(γ + 1); its width relative to T is
# σ_rel = √((γ + 1) / ((γ + 2)²(γ + 3))). Snapshots of a few such averages at several times span many others:
# the average of any (T*, γ*) is approximated by the combination of snapshots whose densities are closest to
# p* in L², found by solving the normal equations of their inner products (closed form for power functions).

#: The two profiles tracked during training (EDM2's pair).
PROFILES = (0.05, 0.10)


def gamma_of(sigma_rel: float) -> float:
    """The exponent γ of the power-function EMA of relative width ``sigma_rel``: the largest real root of
    σ²(γ + 2)²(γ + 3) = γ + 1, i.e. γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) = 0."""
    if not 0 < sigma_rel < 0.28:
        raise FrugalError(f"sigma_rel {sigma_rel} is outside (0, 0.28); pick e.g. 0.05 (short) to 0.25 (long)")
    k = sigma_rel**-2
    return float(max(r.real for r in np.roots([1.0, 7.0, 16.0 - k, 12.0 - k]) if abs(r.imag) < 1e-9))


def sigma_rel_of(gamma: float) -> float:
    """The relative width of the power-function EMA of exponent ``gamma``."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


class PowerEMA:
    """Power-function EMAs of a model's parameters, one per relative width in ``sigma_rels``: after each optimizer
    step at ``images`` images (``batch`` of them new) the average moves towards the weights by 1 − β with
    β = (1 − batch/images)^(γ + 1), which keeps it the τ^γ-weighted average over the run so far."""

    def __init__(self, model: nn.Module, sigma_rels: tuple[float, ...] = PROFILES) -> None:
        self.sigma_rels = tuple(sigma_rels)
        self.gammas = [gamma_of(s) for s in self.sigma_rels]
        self.averages = [[p.detach().clone() for p in model.parameters()] for _ in self.sigma_rels]

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Every average to ``model``'s weights (where a resumed run starts tracking)."""
        for average in self.averages:
            torch._foreach_copy_(average, [p.detach() for p in model.parameters()])

    @torch.no_grad()
    def update(self, model: nn.Module, images: int, batch: int) -> None:
        params = [p.detach() for p in model.parameters()]
        for gamma, average in zip(self.gammas, self.averages, strict=True):
            torch._foreach_lerp_(average, params, 1 - (1 - batch / images) ** (gamma + 1))

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Each profile's averages as ``<profile index>.<parameter name>`` (the model's buffers alongside)."""
        names = [name for name, _ in model.named_parameters()]
        state = {f"{i}.{name}": p for i, average in enumerate(self.averages) for name, p in zip(names, average,
                                                                                                strict=True)}
        buffers = {f"{i}.{name}": b.clone() for i in range(len(self.averages)) for name, b in model.named_buffers()}
        return {**state, **buffers}

    def load_state_dict(self, state: dict[str, torch.Tensor], model: nn.Module) -> None:
        names = [name for name, _ in model.named_parameters()]
        for i, average in enumerate(self.averages):
            for p, name in zip(average, names, strict=True):
                p.copy_(state[f"{i}.{name}"])


def _log_inner(t_a: float, g_a: float, t_b: float, g_b: float) -> float:
    """log ∫ p_a p_b dτ of two power-function densities (times t, exponents g): the integral runs to min(t_a, t_b)."""
    m = min(t_a, t_b)
    return (math.log((g_a + 1) * (g_b + 1) / (g_a + g_b + 1)) + (g_a + g_b + 1) * math.log(m)
            - (g_a + 1) * math.log(t_a) - (g_b + 1) * math.log(t_b))


def posthoc_coefficients(times: list[float], gammas: list[float], time: float, gamma: float) -> np.ndarray:
    """Weights of the snapshots (at ``times``, of exponents ``gammas``) whose combination best approximates the
    power-function EMA of exponent ``gamma`` at ``time`` (least squares on the densities; the weights sum to 1)."""
    scale = max(*times, time)  # inner products in units of the last time: better conditioned
    ts, t = [x / scale for x in times], time / scale
    gram = np.array([[math.exp(_log_inner(a, ga, b, gb)) for b, gb in zip(ts, gammas, strict=True)]
                     for a, ga in zip(ts, gammas, strict=True)])
    target = np.array([math.exp(_log_inner(a, ga, t, gamma)) for a, ga in zip(ts, gammas, strict=True)])
    weights = np.linalg.lstsq(gram, target, rcond=None)[0]
    return weights / weights.sum()


def save_snapshot(folder: Path, phema: PowerEMA, model: nn.Module, images: int) -> Path:
    """Write the averages of every profile at ``images`` images as ``folder/<images>.safetensors`` (atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{images:012d}.safetensors"
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    metadata = {"images": str(images), "sigma_rels": json.dumps(list(phema.sigma_rels))}
    save_file({k: v.detach().cpu().contiguous() for k, v in phema.state_dict(model).items()}, str(tmp), metadata)
    os.replace(tmp, path)
    return path


@dataclass
class Snapshot:
    """One profile's average at ``images`` images (``state``: a model state dict)."""

    images: int
    sigma_rel: float
    state: dict[str, torch.Tensor]


def load_snapshots(folder: Path) -> list[Snapshot]:
    """Every profile of every snapshot under ``folder``, oldest first; unreadable files are skipped with a warning."""
    found = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as f:
                meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
            images, sigma_rels = int(meta["images"]), json.loads(meta["sigma_rels"])
        except (OSError, SafetensorError, KeyError, ValueError, TypeError) as e:
            warnings.warn(f"skipped unreadable EMA snapshot {path.name} ({type(e).__name__})", stacklevel=2)
            continue
        for i, sigma_rel in enumerate(sigma_rels):
            prefix = f"{i}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            found.append(Snapshot(images, float(sigma_rel), state))
    return found


def reconstruct(snapshots: list[Snapshot], sigma_rel: float, images: int | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the power-function EMA of relative width ``sigma_rel`` at ``images`` (default: the last
    snapshot's) as the least-squares combination of ``snapshots`` taken at or before that time."""
    images = images or max(s.images for s in snapshots)
    usable = [s for s in snapshots if s.images <= images]
    if not usable:
        raise FrugalError(f"no EMA snapshot at or before {images} images; train with train.phema_snapshots > 0")
    weights = posthoc_coefficients([s.images for s in usable], [gamma_of(s.sigma_rel) for s in usable], images,
                                   gamma_of(sigma_rel))
    names = usable[0].state
    return {name: sum(float(w) * s.state[name].double() for w, s in zip(weights, usable, strict=True)).to(
        names[name].dtype) if names[name].is_floating_point() else usable[-1].state[name] for name in names}
