"""Noise processes: paths x_t = α(t)·x0 + σ(t)·ε between data (t = 0) and noise (t = 1).

A process knows α, σ, their first and second time derivatives and the log-SNR λ = log(α²/σ²).
Subclasses give α and σ; the derivatives default to autograd on those scalar functions, and the
built-in processes override them with closed forms.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .registry import Registry


class NoiseProcess:
    """Base class. ``t_min``/``t_max`` bound the times used in training and generation."""

    name = "process"
    t_min = 1e-5
    t_max = 1.0

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _derivative(self, fn: str, t: Tensor, order: int) -> Tensor:
        """d^order/dt^order of ``alpha`` or ``sigma`` by autograd (elementwise), inside inference mode too (where
        autograd would otherwise record nothing and every derivative would read as 0)."""
        with torch.inference_mode(False), torch.enable_grad():
            x = t.detach().clone().to(torch.float64).requires_grad_(True)
            y = getattr(self, fn)(x)
            for _ in range(order):
                if not y.requires_grad:  # the previous derivative was constant
                    y = torch.zeros_like(x)
                    break
                (y,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        return y.detach().to(t.dtype)

    def d_alpha(self, t: Tensor) -> Tensor:
        return self._derivative("alpha", t, 1)

    def d_sigma(self, t: Tensor) -> Tensor:
        return self._derivative("sigma", t, 1)

    def dd_alpha(self, t: Tensor) -> Tensor:
        return self._derivative("alpha", t, 2)

    def dd_sigma(self, t: Tensor) -> Tensor:
        return self._derivative("sigma", t, 2)

    def log_snr(self, t: Tensor) -> Tensor:
        """λ(t) = log(α²/σ²)."""
        return 2 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def t_of_log_snr(self, lam: Tensor) -> Tensor:
        """Times t ∈ [t_min, t_max] with log_snr(t) = ``lam`` (float64); targets beyond λ(t_max), λ(t_min) give
        the nearer end. This generic version bisects (λ decreases with t); processes override it in closed form.
        """
        lam = lam.to(torch.float64)
        lo, hi = torch.full_like(lam, self.t_min), torch.full_like(lam, self.t_max)
        for _ in range(BISECTIONS):
            mid = 0.5 * (lo + hi)
            later = self.log_snr(mid) > lam  # λ still too high: the root lies after mid
            lo, hi = torch.where(later, mid, lo), torch.where(later, hi, mid)
        return 0.5 * (lo + hi)

    def clamp(self, t: Tensor) -> Tensor:
        """Times restricted to [t_min, t_max], where α and σ are both usable."""
        return t.clamp(self.t_min, self.t_max)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t for a batch; ``t`` has one entry per sample."""
        return bcast(self.alpha(t), x0) * x0 + bcast(self.sigma(t), x0) * eps


def empirical_posterior_mean(process: NoiseProcess, x_t: Tensor, t: Tensor, reference: Tensor,
                             allowed: Tensor | None = None) -> Tensor:
    """E[x0 | x_t] when x0 is drawn uniformly from ``reference`` [R, ...] (or, with the bool mask ``allowed`` [B, R],
    from the references each row allows): the softmax over references of −‖x_t − α·x0_r‖²/(2σ²), averaging the
    references (float32; one row of ``x_t`` per entry of ``t``).

    With the batch's own x0 among the references this is the stable target of Xu et al. 2023: near t = 0
    it is the sample's own x0, near t = 1 the references' mean.
    """
    flat, refs = x_t.flatten(1).float(), reference.flatten(1).float()
    alpha, sigma = process.alpha(t).float()[:, None], process.sigma(t).float()[:, None]
    # ‖x_t − α·r‖² up to a term that does not depend on r
    distance = alpha**2 * torch.linalg.vector_norm(refs, dim=1).square()[None, :] - 2 * alpha * (flat @ refs.T)
    logits = -distance / (2 * sigma**2)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, -math.inf)
    return (torch.softmax(logits, dim=1) @ refs).reshape(x_t.shape)


def immiscible_order(x0: Tensor, eps: Tensor) -> Tensor:
    """Immiscible diffusion (Li et al. 2024): the permutation of the noise draws ``eps`` that pairs them with the
    images ``x0`` at the least total L2 distance (a linear assignment over the batch; the identity when it is
    already optimal). Each noise draw stays a draw of N(0, I); only which image it noises changes."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x0.flatten(1).double().cpu(), eps.flatten(1).double().cpu())
    rows, cols = linear_sum_assignment(cost.numpy())
    order = torch.empty(len(x0), dtype=torch.long)
    order[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return order


def bcast(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample vector [B] to broadcast against a batch shaped like ``like``."""
    return v.reshape(v.shape + (1,) * (like.dim() - v.dim()))


PROCESSES: Registry[NoiseProcess] = Registry("diffusion.process")
#: Bisection halvings of the generic :meth:`NoiseProcess.t_of_log_snr`: 2^-60 is far below float64 resolution.
BISECTIONS = 60


class _VPProcess(NoiseProcess):
    """Variance preserving: σ = √(1 − α²); subclasses give α and its derivatives."""

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt((1 - self.alpha(t) ** 2).clamp_min(0))

    def d_sigma(self, t: Tensor) -> Tensor:
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)

    def dd_sigma(self, t: Tensor) -> Tensor:
        a, da, dda, s = self.alpha(t), self.d_alpha(t), self.dd_alpha(t), self.sigma(t)
        ds = -a * da / s
        return -(da**2 + a * dda + ds**2) / s


@PROCESSES.register("vp-linear")
class VPLinear(_VPProcess):
    """DDPM's linear β schedule in continuous time: β(t) = β0 + t(β1 − β0)."""

    name = "vp-linear"

    def __init__(self, beta0: float = 0.1, beta1: float = 20.0) -> None:
        self.beta0, self.beta1 = beta0, beta1

    def _log_alpha(self, t: Tensor) -> Tensor:
        return -0.25 * t**2 * (self.beta1 - self.beta0) - 0.5 * t * self.beta0

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self._log_alpha(t))

    def d_alpha(self, t: Tensor) -> Tensor:
        return self.alpha(t) * (-0.5 * (self.beta0 + t * (self.beta1 - self.beta0)))

    def dd_alpha(self, t: Tensor) -> Tensor:
        g1 = -0.5 * (self.beta0 + t * (self.beta1 - self.beta0))
        return self.alpha(t) * (g1**2 - 0.5 * (self.beta1 - self.beta0))

    def log_snr(self, t: Tensor) -> Tensor:
        # log(α²/(1 − α²)) = −log(expm1(−2 log α)), stable near t = 0.
        return -torch.log(torch.expm1(-2 * self._log_alpha(t)))

    def t_of_log_snr(self, lam: Tensor) -> Tensor:
        # α² = sigmoid(λ): solve ¼Δt² + ½β0·t = c with c = −log α = ½·softplus(−λ), in the cancellation-free form
        c = 0.5 * torch.nn.functional.softplus(-lam.to(torch.float64))
        t = 2 * c / (0.5 * self.beta0 + torch.sqrt(0.25 * self.beta0**2 + (self.beta1 - self.beta0) * c))
        return self.clamp(t)


@PROCESSES.register("vp-cosine")
class VPCosine(_VPProcess):
    """Nichol & Dhariwal's cosine schedule, renormalised so α(0) = 1; t is clipped below 1."""

    name = "vp-cosine"
    t_max = 0.996  # α(t_max) ≈ 0.0066, as VP-linear's α(1)

    def __init__(self, s: float = 0.008) -> None:
        self.s = s
        self._c = math.cos(0.5 * math.pi * s / (1 + s))
        self._k = 0.5 * math.pi / (1 + s)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.cos(self._k * (t + self.s)) / self._c

    def d_alpha(self, t: Tensor) -> Tensor:
        return -self._k * torch.sin(self._k * (t + self.s)) / self._c

    def dd_alpha(self, t: Tensor) -> Tensor:
        return -(self._k**2) * self.alpha(t)

    def t_of_log_snr(self, lam: Tensor) -> Tensor:
        # α² = sigmoid(λ)
        alpha = torch.sigmoid(lam.to(torch.float64)).sqrt() * self._c
        return self.clamp(torch.arccos(alpha.clamp(max=1.0)) / self._k - self.s)


@PROCESSES.register("flow")
class Flow(NoiseProcess):
    """Rectified flow / SD3: α = 1 − t, σ = t."""

    name = "flow"
    t_max = 1.0 - 1e-3

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - t

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def d_alpha(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def dd_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def dd_sigma(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def t_of_log_snr(self, lam: Tensor) -> Tensor:
        # λ = 2·log((1 − t)/t)
        return self.clamp(torch.sigmoid(-0.5 * lam.to(torch.float64)))


class ShiftedProcess(NoiseProcess):
    """``base`` with its log-SNR lowered by 2·ln(``shift``) at every t: α(t), σ(t) = α_base(w(t)), σ_base(w(t)) with
    w(t) the base time of log-SNR λ_base(t) − 2·ln(shift). On flow this is SD3's timestep shift
    w(t) = s·t/(1 + (s − 1)·t); on VP paths simple diffusion's shift of the log-SNR (Hoogeboom et al. 2023). A shift
    above 1 spends more of [0, 1] at high noise, which larger images need (their pixels average out more noise);
    shift = 1 is the base process itself. Derivatives come from autograd through w."""

    def __init__(self, base: NoiseProcess, shift: float) -> None:
        self.base, self.shift = base, float(shift)
        self.name, self._offset = base.name, 2 * math.log(self.shift)
        # The times whose warp lands inside the base's [t_min, t_max]: beyond them the warp would sit on the clamp,
        # where α and σ stop changing (zero derivatives, so velocity and x0 could not be told apart at t_max).
        ends = base.log_snr(torch.tensor([base.t_max, base.t_min], dtype=torch.float64)) + self._offset
        t_max, t_min = base.t_of_log_snr(ends).tolist()
        self.t_max = base.t_max if t_max >= base.t_max else t_max - 1e-7
        self.t_min = base.t_min if t_min <= base.t_min else t_min + 1e-7

    def warp(self, t: Tensor) -> Tensor:
        """The base process's time w(t) (float64 inside, ``t``'s dtype out), clamped to its [t_min, t_max]."""
        t64 = t.to(torch.float64)
        w = self.base.t_of_log_snr(self.base.log_snr(t64) - self._offset)
        return w.clamp(self.base.t_min, self.base.t_max).to(t.dtype)

    def alpha(self, t: Tensor) -> Tensor:
        return self.base.alpha(self.warp(t))

    def sigma(self, t: Tensor) -> Tensor:
        return self.base.sigma(self.warp(t))

    def log_snr(self, t: Tensor) -> Tensor:
        return self.base.log_snr(self.warp(t))

    def t_of_log_snr(self, lam: Tensor) -> Tensor:
        return self.clamp(self.base.t_of_log_snr(lam.to(torch.float64) + self._offset))


def shifted(process: NoiseProcess, shift: float) -> NoiseProcess:
    """``process`` shifted by ``shift`` (:class:`ShiftedProcess`), or itself for shift = 1."""
    return process if shift == 1 else ShiftedProcess(process, shift)


def ddpm_alphas_cumprod(steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """ᾱ_i = Π_{j≤i}(1 − β_j) of discrete DDPM; it matches VP-linear at t = (i + 1)/steps."""
    betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)
