"""Timestep samplers: which times t ∈ [0, 1] each training batch sees, and with what weight.

A sampler returns (t, w): times and per-sample importance weights. A sampler that *keeps the
uniform objective* returns w = p_uniform(t)/p(t) = 1/p(t), so the weighted loss is an unbiased
estimate of the uniform-t loss (with less variance where the sampler is good); one that *changes the
objective* returns w = 1. Samplers may learn from the per-sample losses passed to
:meth:`TimestepSampler.update`, and they carry their own random generator so that their state
(``state_dict``) makes a resumed run identical to an uninterrupted one.
Not to be confused with *solvers* (``frugaldiff.solvers``), which generate images.

Ranks and gradient accumulation: a sampler draws the *global* batch, one call per optimizer step, and the
trainer hands each rank and micro-step its share (as it does with the data), so a stratified sampler puts
one draw in every stratum of the whole step, and the pairing of times with images does not depend on the
number of processes or micro-steps. Every rank builds its sampler with the same seed and makes the same
calls, so the generators stay in step; samplers that learn from losses must be given the same losses on
every rank (the trainer gathers them first).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import scipy.special
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import FrugalError
from .noise import NoiseProcess
from .objective import Batch
from .registry import Registry

F64 = torch.float64


class TimestepSampler:
    """Base class: draws the times of whole optimizer steps.

    Subclasses add their own parameters as keyword arguments with typed defaults after ``*``; the
    config exposes them as ``timestep_sampler.<name>.<param>``. ``params`` holds every sampler's
    configured parameters (by sampler name), for samplers built from other samplers.
    """

    #: True when the weights make the loss an unbiased estimate of the uniform-t objective.
    keeps_objective = True
    #: True when each sample's time depends on the sample itself: such a sampler draws with :meth:`draw`.
    conditions_on_images = False

    def __init__(self, process: NoiseProcess, seed: int = 0, params: Mapping[str, Mapping[str, Any]] | None = None
                 ) -> None:
        self.process = process
        self.seed = seed
        self.params = dict(params or {})
        self.progress = 0.0
        self.generator = torch.Generator().manual_seed(seed)

    def set_progress(self, fraction: float) -> None:
        """Share of the training budget done so far (0 to 1); called by the trainer before each step."""
        self.progress = fraction

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` times in [0, 1] and their weights (float64 tensors on the CPU): one optimizer step's global batch."""
        raise NotImplementedError

    def draw(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """The times and weights of an optimizer step's global batch of clean samples ``x0`` (what the trainer
        calls); only samplers that :attr:`conditions_on_images` look at the samples."""
        return self.sample(len(x0))

    def density(self, t: Tensor) -> Tensor:
        """Density p(t) of the draws on [0, 1]; samplers that keep the objective give it (their weight is 1/p)."""
        raise NotImplementedError(f"{type(self).__name__} has no density")

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Per-sample losses of the last batch; the default ignores them."""

    def probe(self, batch: Batch) -> Batch | None:
        """Inputs whose objective the trainer measures before and after this step's update and hands to
        :meth:`learn` (on every rank the same); None, the default: the sampler does not learn from an update's
        effect."""
        return None

    def learn(self, before: Tensor, after: Tensor) -> None:
        """The per-row objective of the last :meth:`probe` batch before and after the update."""

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "progress": self.progress}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.progress = state["progress"]

    # ---- helpers for subclasses -------------------------------------------------------------
    def _uniform(self, n: int) -> Tensor:
        """n draws from U(0, 1)."""
        return torch.rand(n, generator=self.generator, dtype=F64)

    def _normal(self, n: int) -> Tensor:
        """n draws from N(0, 1)."""
        return torch.randn(n, generator=self.generator, dtype=F64)

    def _normal_or_stratified(self, n: int, stratified: bool) -> Tensor:
        """n draws from N(0, 1): independent, or the normal quantiles of :meth:`_stratified` points."""
        if not stratified:
            return self._normal(n)
        return torch.special.ndtri(self._stratified(n).clamp(1e-12, 1 - 1e-12))

    def _stratified(self, n: int) -> Tensor:
        """n points of [0, 1), point i in stratum [i/n, (i + 1)/n) with its own uniform jitter."""
        return (torch.arange(n) + self._uniform(n)) / n

    def _require(self, ok: bool, param: str, value: Any, valid: str) -> None:
        """Raise a one-line FrugalError naming ``timestep_sampler.<name>.<param>`` unless ``ok``."""
        if not ok:
            name = next((k for k in TIMESTEP_SAMPLERS if TIMESTEP_SAMPLERS.get(k) is type(self)), type(self).__name__)
            raise FrugalError(f"timestep_sampler.{name}.{param} = {value!r} is invalid; use {valid}")


TIMESTEP_SAMPLERS: Registry[TimestepSampler] = Registry("diffusion.timestep_sampler")


class _PiecewiseConstant:
    """A density on [0, 1], constant on each interval [edges[i], edges[i + 1]), with mass ∝ masses[i]."""

    def __init__(self, edges: Tensor, masses: Tensor) -> None:
        self.edges = edges.to(F64)
        cumulative = torch.cumsum(masses.to(F64), 0)
        self.cdf = torch.cat([torch.zeros(1, dtype=F64), cumulative / cumulative[-1]])  # ends at exactly 1
        self.values = (self.cdf[1:] - self.cdf[:-1]) / (self.edges[1:] - self.edges[:-1])

    def piece(self, t: Tensor) -> Tensor:
        """Index of the piece holding each t."""
        return (torch.searchsorted(self.edges, t, right=True) - 1).clamp(0, len(self.values) - 1)

    def density(self, t: Tensor) -> Tensor:
        return self.values[self.piece(t)]

    def inverse(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Inverse CDF of u ∈ [0, 1): the times and the index of their piece (never one of mass 0)."""
        i = torch.searchsorted(self.cdf[1:], u, right=True)  # cdf[i] <= u < cdf[i + 1]
        frac = ((u - self.cdf[i]) / (self.cdf[i + 1] - self.cdf[i])).clamp(0, 1)
        return self.edges[i] + frac * (self.edges[i + 1] - self.edges[i]), i


@TIMESTEP_SAMPLERS.register("uniform")
class UniformSampler(TimestepSampler):
    """t ~ U(0, 1), weight 1: the standard objective (keeps the uniform objective)."""

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        t = self._uniform(n)
        return t, torch.ones_like(t)

    def density(self, t: Tensor) -> Tensor:
        return torch.ones_like(t, dtype=F64)


@TIMESTEP_SAMPLERS.register("stratified")
class StratifiedSampler(UniformSampler):
    """One draw per stratum of [0, 1) across the global batch (k-diffusion); keeps the uniform objective.

    The n strata of a batch of n (all ranks and micro-steps) are filled once per optimizer step, each with its
    own uniform jitter; every single draw is uniform on [0, 1], so the weight is 1.
    """

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        t = self._stratified(n)
        return t, torch.ones_like(t)


@TIMESTEP_SAMPLERS.register("antithetic")
class AntitheticSampler(UniformSampler):
    """Pairs t and 1 − t side by side in the batch; keeps the uniform objective.

    An odd batch ends with a lone uniform draw. Lowers the variance for losses that are monotone in t.
    """

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        u = self._uniform((n + 1) // 2)
        t = torch.stack([u, 1 - u], dim=1).flatten()[:n]
        return t, torch.ones_like(t)


@TIMESTEP_SAMPLERS.register("lognormal")
class LogNormalSampler(TimestepSampler):
    """EDM: ln σ̃ ~ N(p_mean, p_std²) for σ̃ = σ/α, mapped to t through the process; changes the objective.

    t solves log_snr(t) = −2 ln σ̃ and lies in [t_min, t_max] (draws beyond them land on the ends).
    EDM uses −1.2/1.2, EDM2 −0.4/1.0. With ``stratified`` (the default; EDM draws independently) the normal
    draws are the quantiles of one point per stratum of [0, 1) across batch, ranks and micro-steps: the same
    density, and every batch spread over it.
    """

    keeps_objective = False

    def __init__(self, *, p_mean: float = -1.2, p_std: float = 1.2, stratified: bool = True, **base: Any) -> None:
        super().__init__(**base)
        self._require(math.isfinite(p_mean), "p_mean", p_mean, "a finite number")
        self._require(0 < p_std < math.inf, "p_std", p_std, "a number > 0")
        self.p_mean, self.p_std, self.stratified = p_mean, p_std, stratified

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        log_sigma = self.p_mean + self.p_std * self._normal_or_stratified(n, self.stratified)
        t = self.process.t_of_log_snr(-2 * log_sigma)
        return t, torch.ones_like(t)


@TIMESTEP_SAMPLERS.register("logit_normal")
class LogitNormalSampler(TimestepSampler):
    """SD3: t = sigmoid(m + s·z), z ~ N(0, 1); changes the objective.

    The class defaults m = 0.5 (SD3: 0) and stratified draws lean to higher t and spread each batch, measured best
    with the stable target on mnist5000 and twemoji (docs/speedrun.md); the config's "auto" takes them
    (:func:`frugaldiff.components.resolved_recipe`). With ``stratified`` z takes the normal
    quantiles of one point per stratum of [0, 1) across batch, ranks and micro-steps, as
    :class:`LogNormalSampler` does.
    """

    keeps_objective = False

    def __init__(self, *, m: float = 0.5, s: float = 1.0, stratified: bool = True, **base: Any) -> None:
        super().__init__(**base)
        self._require(math.isfinite(m), "m", m, "a finite number")
        self._require(0 < s < math.inf, "s", s, "a number > 0")
        self.m, self.s, self.stratified = m, s, stratified

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        t = torch.sigmoid(self.m + self.s * self._normal_or_stratified(n, self.stratified))
        return t, torch.ones_like(t)


#: The largest mode-sampling scale for which t(u) stays monotone (SD3's bound).
_MODE_SCALE_MAX = 2 / (math.pi - 2)


@TIMESTEP_SAMPLERS.register("mode")
class ModeSampler(TimestepSampler):
    """SD3's mode sampling: u ~ U(0, 1), t = 1 − u − scale·(cos²(πu/2) − 1 + u); changes the objective.

    scale > 0 favours the middle of [0, 1], scale < 0 its ends, scale = 0 is uniform.
    """

    keeps_objective = False

    def __init__(self, *, scale: float = 1.29, **base: Any) -> None:
        super().__init__(**base)
        self._require(-1 <= scale <= _MODE_SCALE_MAX, "scale", scale, f"a number in [-1, {_MODE_SCALE_MAX:.4f}]")
        self.scale = scale

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        u = self._uniform(n)
        t = (1 - u - self.scale * (torch.cos(0.5 * math.pi * u) ** 2 - 1 + u)).clamp(0, 1)
        return t, torch.ones_like(t)


@TIMESTEP_SAMPLERS.register("beta")
class BetaSampler(TimestepSampler):
    """t ~ Beta(a, b); the defaults tilt the draws mildly towards t = 0 (density 1.5·√(1 − t)); changes the objective.

    Each call seeds a NumPy generator from the sampler's own, so the draws follow ``state_dict``.
    """

    keeps_objective = False

    def __init__(self, *, a: float = 1.0, b: float = 1.5, **base: Any) -> None:
        super().__init__(**base)
        self._require(0 < a < math.inf, "a", a, "a number > 0")
        self._require(0 < b < math.inf, "b", b, "a number > 0")
        self.a, self.b = a, b

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        seed = int(torch.randint(2**63 - 1, (1,), generator=self.generator))
        t = torch.from_numpy(np.random.default_rng(seed).beta(self.a, self.b, size=n)).to(F64)
        return t, torch.ones_like(t)


@TIMESTEP_SAMPLERS.register("near_zero")
class NearZeroSampler(TimestepSampler):
    """More draws close to t = 0; keeps the uniform objective if keep_objective, else changes the objective.

    shape "step" (SpeeD): density k times higher below tau than above it. shape "power": t = u^power
    for u ~ U(0, 1), density t^(1/power − 1)/power (smooth, unbounded at 0; weights t^(1 − 1/power)·power
    stay below power). With keep_objective the weight is 1/p(t) (unbiased for the uniform loss),
    otherwise 1 (SpeeD's choice).
    """

    def __init__(self, *, shape: str = "step", k: float = 5.0, tau: float = 0.7, power: float = 2.0,
                 keep_objective: bool = False, **base: Any) -> None:
        super().__init__(**base)
        self._require(shape in ("step", "power"), "shape", shape, "'step' or 'power'")
        self._require(1 <= k < math.inf, "k", k, "a number >= 1")
        self._require(0 < tau < 1, "tau", tau, "a number in (0, 1)")
        self._require(1 <= power < math.inf, "power", power, "a number >= 1")
        self.shape, self.power, self.keep_objective = shape, power, keep_objective
        self.step_density = _PiecewiseConstant(torch.tensor([0.0, tau, 1.0]), torch.tensor([k * tau, 1 - tau]))

    @property
    def keeps_objective(self) -> bool:  # type: ignore[override]
        return self.keep_objective

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        u = self._uniform(n)
        t = self.step_density.inverse(u)[0] if self.shape == "step" else u**self.power
        return t, 1 / self.density(t) if self.keep_objective else torch.ones_like(t)

    def density(self, t: Tensor) -> Tensor:
        if self.shape == "step":
            return self.step_density.density(t)
        return t ** (1 / self.power - 1) / self.power


@TIMESTEP_SAMPLERS.register("speed")
class SpeeDSampler(TimestepSampler):
    """SpeeD (Wang et al. 2024, NUS-HPC-AI-Lab/SpeeD ``Speed_IDDPM``): asymmetric sampling; changes the objective.

    The "convergence area" where x_t has all but reached the noise (log-SNR below ``tau_log_snr``; SpeeD's step 700
    of 1000 on DDPM's linear schedule, λ ≈ −5) is drawn ``k`` times less often than the rest. The first ⌈n/2⌉
    times of a batch come from that step density; each of the other ⌊n/2⌋ mirrors one of them about t_m, the
    time of log-SNR ``mirror_log_snr`` (SpeeD's step 642, where d√(1 − ᾱ)/dt falls below 10⁻⁴: λ ≈ −4.18),
    t' = |t_m − t|, which puts them all below t_m. Weight 1 (SpeeD returns none). Its change-aware weighting is
    the weighting ``speed``.
    """

    keeps_objective = False

    def __init__(self, *, k: float = 5.0, tau_log_snr: float = -5.0, mirror_log_snr: float = -4.18,
                 dual: bool = True, **base: Any) -> None:
        super().__init__(**base)
        self._require(1 <= k < math.inf, "k", k, "a number >= 1")
        self._require(math.isfinite(tau_log_snr), "tau_log_snr", tau_log_snr, "a finite number")
        self._require(math.isfinite(mirror_log_snr), "mirror_log_snr", mirror_log_snr, "a finite number")
        self.dual = dual
        tau = float(self.process.t_of_log_snr(torch.tensor([tau_log_snr], dtype=F64)))
        self.tau = min(max(tau, 1e-6), 1 - 1e-6)
        self.mirror = float(self.process.t_of_log_snr(torch.tensor([mirror_log_snr], dtype=F64)))
        self.base = _PiecewiseConstant(torch.tensor([0.0, self.tau, 1.0]), torch.tensor([k * self.tau, 1 - self.tau]))

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        drawn = self.base.inverse(self._uniform((n + 1) // 2 if self.dual else n))[0]
        t = torch.cat([drawn, (self.mirror - drawn[: n // 2]).abs()]) if self.dual else drawn
        return t, torch.ones_like(t)

    def mirrored_density(self, t: Tensor) -> Tensor:
        """Density of a mirrored draw |t_m − t|, t from the step density."""
        m = self.mirror
        below = torch.where(t <= m, self.base.density((m - t).clamp(0, 1)), torch.zeros_like(t))
        above = torch.where(t <= 1 - m, self.base.density((m + t).clamp(0, 1)), torch.zeros_like(t))
        return below + above

    def density(self, t: Tensor) -> Tensor:
        """The marginal of one draw of a large batch: half step density, half mirrored."""
        t = t.to(F64)
        return 0.5 * (self.base.density(t) + self.mirrored_density(t)) if self.dual else self.base.density(t)


@TIMESTEP_SAMPLERS.register("laplace")
class LaplaceSampler(TimestepSampler):
    """Hang et al. 2024: log-SNR λ ~ Laplace(mu, b), mapped to t through the process; changes the objective.

    "Improved noise schedule for diffusion training": weight 1, which is what their schedule does.

    Their schedule is λ(t) = mu − b·sgn(½ − t)·ln(1 − 2|t − ½|) under uniform t, i.e. this density over λ, on any
    process. With ``stratified`` (the default; the paper draws t independently) the draws are the quantiles of one
    point per stratum of [0, 1) across batch, ranks and micro-steps.
    """

    keeps_objective = False

    def __init__(self, *, mu: float = 0.0, b: float = 0.5, stratified: bool = True, **base: Any) -> None:
        super().__init__(**base)
        self._require(math.isfinite(mu), "mu", mu, "a finite number")
        self._require(0 < b < math.inf, "b", b, "a number > 0")
        self.mu, self.b, self.stratified = mu, b, stratified

    def log_snr_of(self, u: Tensor) -> Tensor:
        """The schedule: λ of uniform u ∈ (0, 1) (the Laplace quantile at 1 − u)."""
        return self.mu - self.b * torch.sign(0.5 - u) * torch.log1p(-2 * (u - 0.5).abs())

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        u = (self._stratified(n) if self.stratified else self._uniform(n)).clamp(1e-12, 1 - 1e-12)
        t = self.process.t_of_log_snr(self.log_snr_of(u))
        return t, torch.ones_like(t)


@TIMESTEP_SAMPLERS.register("range")
class RangeSampler(TimestepSampler):
    """t ~ U(lo, hi): trains (or probes) only part of [0, 1], as the diagnostics do; changes the objective."""

    keeps_objective = False

    def __init__(self, *, lo: float = 0.0, hi: float = 1.0, **base: Any) -> None:
        super().__init__(**base)
        self._require(0 <= lo < 1, "lo", lo, "a number in [0, 1) below hi")
        self._require(lo < hi <= 1, "hi", hi, f"a number in ({lo}, 1]")
        self.lo, self.hi = lo, hi

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        t = self.lo + (self.hi - self.lo) * self._uniform(n)
        return t, torch.ones_like(t)


class _BinnedImportanceSampler(TimestepSampler):
    """Importance sampling over ``bins`` equal bins of t, from per-bin loss statistics; keeps the uniform objective.

    A bin is chosen with probability p_b, t is uniform inside it and the weight is 1/(bins·p_b), the
    inverse of the density bins·p_b. Subclasses give the bin scores (None while warming up: uniform).
    """

    def _setup(self, bins: int, mix: float, stratify: bool) -> None:
        self.bins, self.mix, self.stratify = bins, mix, stratify
        self.edges = torch.linspace(0, 1, bins + 1, dtype=F64)

    def _scores(self) -> Tensor | None:
        """Unnormalised bin probabilities, or None while warming up."""
        raise NotImplementedError

    def _observe(self, bins: Tensor, losses: Tensor) -> None:
        """Take in finite losses and their bin indices."""
        raise NotImplementedError

    def bin_probabilities(self) -> Tensor:
        """Current probability of each bin: scores/Σ scores mixed with a share ``mix`` of uniform."""
        uniform = torch.full((self.bins,), 1 / self.bins, dtype=F64)
        scores = self._scores()
        if scores is None or not (scores.sum() > 0 and torch.isfinite(scores).all()):
            return uniform
        return (1 - self.mix) * scores / scores.sum() + self.mix * uniform

    def _distribution(self) -> _PiecewiseConstant:
        return _PiecewiseConstant(self.edges, self.bin_probabilities())

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        dist = self._distribution()
        t, bins = dist.inverse(self._stratified(n) if self.stratify else self._uniform(n))
        return t, 1 / dist.values[bins]

    def density(self, t: Tensor) -> Tensor:
        return self._distribution().density(t)

    def update(self, t: Tensor, losses: Tensor) -> None:
        t, losses = t.to(F64).flatten(), losses.to(F64).flatten()
        finite = torch.isfinite(losses) & torch.isfinite(t)
        t, losses = t[finite], losses[finite]
        self._observe((t * self.bins).long().clamp(0, self.bins - 1), losses)


@TIMESTEP_SAMPLERS.register("loss_second_moment")
class LossSecondMomentSampler(_BinnedImportanceSampler):
    """improved-diffusion's importance sampler on bins of t; keeps the uniform objective.

    Keeps the last ``history`` losses of each bin; until every bin has them, samples uniformly
    (weight 1). Then p_b ∝ √mean(L²), mixed with ``uniform_mix`` uniform. The warm-up takes about
    570 images at batch 8 with the defaults (32 bins × 10 losses, drawn at random).
    """

    def __init__(self, *, bins: int = 32, history: int = 10, uniform_mix: float = 0.001, **base: Any) -> None:
        super().__init__(**base)
        self._require(bins >= 1, "bins", bins, "an integer >= 1")
        self._require(history >= 1, "history", history, "an integer >= 1")
        self._require(0 <= uniform_mix <= 1, "uniform_mix", uniform_mix, "a number in [0, 1]")
        self._setup(bins, uniform_mix, stratify=False)
        self.history = torch.zeros(bins, history, dtype=F64)
        self.counts = torch.zeros(bins, dtype=torch.long)  # losses seen per bin (the newest goes to count % history)

    def _scores(self) -> Tensor | None:
        if bool((self.counts < self.history.shape[1]).any()):
            return None
        return torch.sqrt((self.history**2).mean(dim=1))

    def _observe(self, bins: Tensor, losses: Tensor) -> None:
        history, counts = self.history.tolist(), self.counts.tolist()  # Python floats: 100× faster per loss
        for b, loss in zip(bins.tolist(), losses.tolist(), strict=True):
            history[b][counts[b] % len(history[b])] = loss
            counts[b] += 1
        self.history, self.counts = torch.tensor(history, dtype=F64), torch.tensor(counts)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "history": self.history.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.history, self.counts = state["history"].clone(), state["counts"].clone()


@TIMESTEP_SAMPLERS.register("adaptive")
class AdaptiveSampler(_BinnedImportanceSampler):
    """Importance sampling for small batches from running per-bin loss moments; keeps the uniform objective.

    Each bin keeps a running mean of L and L² (the plain mean over its first 1/(1 − decay)
    observations, then an EMA with ``decay``). Once every bin has ``warmup`` observations,
    p_b ∝ √E[L²] smoothed ``smoothing`` times with a [1, 2, 1]/4 kernel over neighbouring bins,
    mixed with a share ``floor`` of uniform (so weights stay below 1/floor). Draws are stratified
    over the batch, ranks and micro-steps in probability space (``stratify``). With the defaults
    (32 bins, 2 observations each) the warm-up takes about 180 images at batch 8 (95%: 250), well
    under 1% of a 50k-image run; before it, sampling is stratified uniform.
    """

    def __init__(self, *, bins: int = 32, decay: float = 0.9, warmup: int = 2, smoothing: int = 1,
                 floor: float = 0.1, stratify: bool = True, **base: Any) -> None:
        super().__init__(**base)
        self._require(bins >= 1, "bins", bins, "an integer >= 1")
        self._require(0 <= decay < 1, "decay", decay, "a number in [0, 1)")
        self._require(warmup >= 1, "warmup", warmup, "an integer >= 1")
        self._require(smoothing >= 0, "smoothing", smoothing, "an integer >= 0")
        self._require(0 < floor <= 1, "floor", floor, "a number in (0, 1]")
        self._setup(bins, floor, stratify)
        self.decay, self.warmup, self.smoothing = decay, warmup, smoothing
        self.mean = torch.zeros(bins, dtype=F64)
        self.second_moment = torch.zeros(bins, dtype=F64)
        self.counts = torch.zeros(bins, dtype=torch.long)

    def variance(self) -> Tensor:
        """Running variance of the loss in each bin."""
        return (self.second_moment - self.mean**2).clamp_min(0)

    def _scores(self) -> Tensor | None:
        if bool((self.counts < self.warmup).any()):
            return None
        scores = torch.sqrt(self.second_moment.clamp_min(0))
        for _ in range(self.smoothing):
            padded = torch.cat([scores[:1], scores, scores[-1:]])
            scores = 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]
        return scores

    def _observe(self, bins: Tensor, losses: Tensor) -> None:
        counts, mean, second = self.counts.tolist(), self.mean.tolist(), self.second_moment.tolist()
        for b, loss in zip(bins.tolist(), losses.tolist(), strict=True):  # in order: Python floats, 100× faster
            counts[b] += 1
            rate = max(1 / counts[b], 1 - self.decay)
            mean[b] += rate * (loss - mean[b])
            second[b] += rate * (loss**2 - second[b])
        self.counts = torch.tensor(counts)
        self.mean, self.second_moment = torch.tensor(mean, dtype=F64), torch.tensor(second, dtype=F64)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mean": self.mean.clone(), "second_moment": self.second_moment.clone(),
                "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.mean, self.second_moment = state["mean"].clone(), state["second_moment"].clone()
        self.counts = state["counts"].clone()


def policy_features(x0: Tensor, side: int = 8) -> Tensor:
    """What the policy sampler sees of each clean sample: images average-pooled to at most ``side``×``side`` per
    channel, vectors as they are; float32 on the CPU, one row per sample."""
    x = x0.detach().float()
    if x.dim() == 4:
        x = F.adaptive_avg_pool2d(x, (min(side, x.shape[2]), min(side, x.shape[3])))
    return x.flatten(1).cpu()


class BetaPolicy(nn.Module):
    """Features → Beta(α, β) over t, α, β = softplus(MLP) + 1e-5; the last layer starts at weight 0, bias 0.5, so
    every sample starts at α = β ≈ 0.97 (nearly uniform), as Kim et al. initialise theirs."""

    def __init__(self, features: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.constant_(self.net[-1].bias, 0.5)

    def forward(self, features: Tensor) -> torch.distributions.Beta:
        alpha, beta = (F.softplus(self.net(features)) + 1e-5).unbind(-1)
        return torch.distributions.Beta(alpha, beta)


@TIMESTEP_SAMPLERS.register("kim")
class PolicySampler(TimestepSampler):
    """Kim et al. 2024's learned policy π(t | x0), REINFORCE on each update's loss decrease; changes the objective.

    arXiv 2411.09998, code ku-dmlab/Adaptive-Timestep-Sampler; weight 1, as theirs.

    Each image's time is drawn from its own Beta(α, β) (:class:`BetaPolicy` of :func:`policy_features`; theirs is
    a 0.7M-parameter CNN on the full image). On the first step and every ``every`` steps after it the trainer
    measures the objective before and after the update on (a) the step's images at the ``probes`` probe times and
    (b) one of them at ``grid`` evenly spaced times — in eval mode with the same noise before and after (theirs:
    fresh noise and dropout on each side, a noisier reward). Each image's reward r is the decrease of its objective
    summed over the probe times, and the policy takes one Adam step (``lr``, gradient norm clipped to 1) on
    −mean(log π(t) · r) − ``entropy`` · mean(H[π]), without baseline, as theirs. The probe times are then chosen as
    theirs (scikit-learn's SelectKBest with f_regression): the ``probes`` grid times whose decrease correlates most
    with the decrease summed over the grid, over the last ``history`` sweeps (b); the lowest grid times until two
    sweeps exist. The extra cost is 2·(probes·batch + grid) forward passes every ``every`` steps (≈ 5 % at
    batch 64). Without images (:meth:`sample`, for plots) it draws for an all-zero image.
    """

    keeps_objective = False
    conditions_on_images = True

    def __init__(self, *, every: int = 40, probes: int = 3, grid: int = 20, history: int = 20, lr: float = 0.01,
                 entropy: float = 0.01, hidden: int = 64, **base: Any) -> None:
        super().__init__(**base)
        self._require(every >= 1, "every", every, "an integer >= 1")
        self._require(grid >= 2, "grid", grid, "an integer >= 2")
        self._require(1 <= probes <= grid, "probes", probes, f"an integer in [1, grid = {grid}]")
        self._require(history >= 2, "history", history, "an integer >= 2")
        self._require(0 < lr < math.inf, "lr", lr, "a number > 0")
        self._require(0 <= entropy < math.inf, "entropy", entropy, "a number >= 0")
        self._require(hidden >= 1, "hidden", hidden, "an integer >= 1")
        self.every, self.history, self.lr, self.entropy, self.hidden = every, history, lr, entropy, hidden
        self.grid = (torch.arange(grid, dtype=F64) + 0.5) / grid
        self.chosen = list(range(probes))  # indices into the grid: the lowest times first (theirs: steps 0, 1, 2)
        self.sweeps: list[list[float]] = []  # the sweep image's decrease at each grid time, newest last
        self.draws = 0
        self.policy: BetaPolicy | None = None
        self.optimizer: torch.optim.Adam | None = None
        self._pending: tuple[Tensor, Tensor] | None = None  # features and draws of a step whose update is probed

    def _policy(self, features: int) -> BetaPolicy:
        if self.policy is None:  # built at the first draw, when the size of the features is known
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self.policy = BetaPolicy(features, self.hidden)
            self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=self.lr)
        return self.policy

    def _times(self, dist: torch.distributions.Beta) -> Tensor:
        """One time per Beta of ``dist``: the inverse Beta CDF of the sampler's own uniform draws."""
        u = self._uniform(len(dist.concentration1)).numpy()
        t = scipy.special.betaincinv(dist.concentration1.detach().double().numpy(),
                                     dist.concentration0.detach().double().numpy(), u)
        return torch.from_numpy(t).clamp(1e-6, 1 - 1e-6)

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        if self.policy is None:  # the policy as it starts, the same for every image
            start = torch.full((n,), float(F.softplus(torch.tensor(0.5))) + 1e-5)
            dist = torch.distributions.Beta(start, start)
        else:
            with torch.no_grad():
                dist = self.policy(torch.zeros(n, self.policy.net[0].in_features))
        t = self._times(dist)
        return t, torch.ones_like(t)

    def draw(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        self.draws += 1
        features = policy_features(x0)
        with torch.no_grad():
            t = self._times(self._policy(features.shape[1])(features))
        self._pending = (features, t) if (self.draws - 1) % self.every == 0 else None
        return t, torch.ones_like(t)

    def probe(self, batch: Batch) -> Batch | None:
        if self._pending is None:
            return None
        n, probes, device = len(batch.x0), len(self.chosen), batch.x0.device
        sweep_image = int(self._uniform(1).item() * n)
        rows = torch.cat([torch.arange(n).repeat(probes), torch.full((len(self.grid),), sweep_image)]).to(device)
        t = torch.cat([self.grid[self.chosen].repeat_interleave(n), self.grid])
        eps = torch.randn((len(rows), *batch.x0.shape[1:]), generator=self.generator).to(device)
        return replace(batch, x0=batch.x0[rows], t=self.process.clamp(t).to(device, torch.float32), eps=eps,
                       importance=torch.ones(len(rows), device=device),
                       labels=None if batch.labels is None else batch.labels[rows],
                       coords=None if batch.coords is None else batch.coords[rows])

    def learn(self, before: Tensor, after: Tensor) -> None:
        assert self._pending is not None and self.optimizer is not None, "learn() follows a probe()"
        (features, t), self._pending = self._pending, None
        n, probes = len(t), len(self.chosen)
        decrease = (before - after).detach().double().cpu()
        reward = decrease[: n * probes].view(probes, n).sum(0)
        if not bool(torch.isfinite(decrease).all()):
            return  # a non-finite step: nothing to learn from
        self.sweeps = [*self.sweeps, decrease[n * probes:].tolist()][-self.history:]
        dist = self._policy(features.shape[1])(features)
        loss = -(dist.log_prob(t.float()) * reward.float()).mean() - self.entropy * dist.entropy().mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        self.optimizer.step()
        self._choose()

    def _choose(self) -> None:
        """The probe times: the grid times whose decrease best predicts the total decrease of a sweep."""
        if len(self.sweeps) < 2:
            return
        x = np.asarray(self.sweeps)
        x, y = x - x.mean(0), x.sum(1) - x.sum(1).mean()
        with np.errstate(divide="ignore", invalid="ignore"):
            r2 = np.nan_to_num((x.T @ y) ** 2 / ((x**2).sum(0) * (y**2).sum()), nan=-1.0)
        self.chosen = sorted(np.argsort(-r2, kind="stable")[: len(self.chosen)].tolist())

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "draws": self.draws, "chosen": list(self.chosen),
                "sweeps": [list(s) for s in self.sweeps],
                "features": None if self.policy is None else self.policy.net[0].in_features,
                "policy": None if self.policy is None else self.policy.state_dict(),
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.draws, self.chosen = state["draws"], list(state["chosen"])
        self.sweeps = [list(s) for s in state["sweeps"]]
        if state["policy"] is not None:
            self._policy(state["features"]).load_state_dict(state["policy"])
            self.optimizer.load_state_dict(state["optimizer"])


_COMPOSITES = ("mixture", "curriculum")


class _CompositeSampler(TimestepSampler):
    """Draws from child samplers with the probabilities ``mix_weights``.

    Keeps the uniform objective when every child does: then the weight is 1/Σ_k π_k p_k(t), the
    inverse of the mixture's density (not the drawing child's own weight). Otherwise the weight is 1.
    Children share this sampler's generator; each batch is split among them by a stratified draw
    (the same on every rank), and every child sees every loss.
    """

    def _check_part(self, name: str, param: str) -> None:
        valid = [k for k in TIMESTEP_SAMPLERS
                 if k not in _COMPOSITES and not TIMESTEP_SAMPLERS.get(k).conditions_on_images]
        self._require(name in valid, param, name, "one of " + ", ".join(valid))

    def _build(self, names: list[str]) -> None:
        self.children = [TIMESTEP_SAMPLERS.create(name, process=self.process, seed=self.seed, params=self.params,
                                                  **self.params.get(name, {})) for name in names]
        for child in self.children:
            child.generator = self.generator

    def mix_weights(self) -> Tensor:
        """Probability of each child (sums to 1)."""
        raise NotImplementedError

    @property
    def keeps_objective(self) -> bool:  # type: ignore[override]
        return all(child.keeps_objective for child in self.children)

    def set_progress(self, fraction: float) -> None:
        super().set_progress(fraction)
        for child in self.children:
            child.set_progress(fraction)

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        u = (torch.arange(n, dtype=F64) + torch.rand(n, generator=self.generator, dtype=F64)) / n
        cdf = torch.cumsum(self.mix_weights(), 0)
        which = torch.searchsorted(cdf[:-1], u, right=True)
        t = torch.empty(n, dtype=F64)
        for k, child in enumerate(self.children):
            chosen = which == k
            if bool(chosen.any()):
                t[chosen] = child.sample(int(chosen.sum()))[0]
        return t, 1 / self.density(t) if self.keeps_objective else torch.ones_like(t)

    def density(self, t: Tensor) -> Tensor:
        pis = self.mix_weights()
        return sum((pi * child.density(t) for pi, child in zip(pis.tolist(), self.children, strict=True) if pi > 0),
                   torch.zeros_like(t, dtype=F64))

    def update(self, t: Tensor, losses: Tensor) -> None:
        for child in self.children:
            child.update(t, losses)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "children": [child.state_dict() for child in self.children]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for child, child_state in zip(self.children, state["children"], strict=True):
            child.load_state_dict(child_state)
        super().load_state_dict(state)


@TIMESTEP_SAMPLERS.register("mixture")
class MixtureSampler(_CompositeSampler):
    """A weighted mix of samplers; keeps the uniform objective if every part does, else changes the objective.

    Keeping it, the weight is 1/Σ π_k p_k(t). Each part uses its own ``timestep_sampler.<part>.*``
    parameters; parts cannot be composites.
    """

    def __init__(self, *, samplers: list = ["uniform", "logit_normal"],  # noqa: B006 - never mutated
                 weights: list = [0.5, 0.5], **base: Any) -> None:  # noqa: B006
        super().__init__(**base)
        self._require(len(samplers) >= 1, "samplers", samplers, "a list of one or more sampler names")
        self._require(len(weights) == len(samplers) and all(w >= 0 for w in weights) and sum(weights) > 0,
                      "weights", weights, f"{len(samplers)} numbers >= 0, not all 0 (one per sampler)")
        for name in samplers:
            self._check_part(name, "samplers")
        self._build(list(samplers))
        self.weights = torch.tensor(weights, dtype=F64) / sum(weights)

    def mix_weights(self) -> Tensor:
        return self.weights


@TIMESTEP_SAMPLERS.register("curriculum")
class CurriculumSampler(_CompositeSampler):
    """Moves from sampler start to end over part of the budget; keeps the uniform objective if both do, else changes it.

    At progress f (share of the budget done) it is the mixture (1 − λ)·start + λ·end with
    λ = min(1, f/over), weighted by the inverse of that mixture's density when both keep the objective.
    """

    def __init__(self, *, start: str = "uniform", end: str = "logit_normal", over: float = 1.0,
                 **base: Any) -> None:
        super().__init__(**base)
        self._require(0 < over <= 1, "over", over, "a number in (0, 1]")
        self._check_part(start, "start")
        self._check_part(end, "end")
        self._build([start, end])
        self.over = over

    def mix_weights(self) -> Tensor:
        share = min(1.0, max(0.0, self.progress / self.over))
        return torch.tensor([1 - share, share], dtype=F64)
