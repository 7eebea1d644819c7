"""Loss weightings: how much each time t counts, expressed as a weight on the x0-space error.

Because a weighting lives in x0 space (a function of t through α, σ and the SNR), it composes with
every prediction type: ``PredictionType.loss`` applies it (a linear type multiplies its own error by the
weight times A(t)², :meth:`Weighting.weigh`; the mixed type weights the mixture's x0 error directly).
``none`` keeps the prediction type's own unit-variance loss: its x0 weight is 1/A(t)².

All weights are computed from λ = log SNR (``process.log_snr``), SNR = α²/σ², so they stay finite over
[t_min, t_max] on every process. Conversions used in the docstrings below:

* ε-MSE = SNR · x0-MSE, so an ε-space weight w becomes the x0 weight w·SNR.
* EDM's noise level is σ̃ = σ/α (x_t/α = x0 + σ̃ε on any path) and its denoiser output is x̂0, so an EDM
  weight λ(σ̃) on the denoiser is the x0 weight itself; 1/σ̃² = SNR.
* SD3's σ is the noise level s of the flow path x = (1 − s)·x0 + s·ε. Any path is that one rescaled:
  x_t/(α + σ) is the flow point with s = σ/(α + σ), the same SNR, so 1/s = 1 + √SNR. The flow-matching
  target ε − x0 gives x̂0 = x − s·v̂, so its MSE is x0-MSE/s²: a weight w(s) on the flow-matching loss is
  the x0 weight w(s)/s². On the flow process s = σ = t.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .errors import FrugalError
from .noise import NoiseProcess
from .prediction import LINEAR_TYPES, PREDICTIONS, PredictionType
from .registry import Registry


class Weighting:
    """Base class: ``x0_weight`` gives the weight per sample of the x0-space squared error.

    Parameters are keyword arguments with typed defaults; the config exposes them as
    ``weighting.<name>.<param>``. A weighting that learns (EDM2's) puts its parameters in the denoiser as
    its :meth:`uncertainty` module, so the model's optimizer, EMA, DDP and checkpoints carry them.
    """

    def x0_weight(self, prediction: PredictionType, t: Tensor) -> Tensor:
        """The weight on ‖x̂0 − x0‖² per sample at times ``t`` for ``prediction``'s model."""
        raise NotImplementedError

    def weigh(self, error: Tensor, prediction: PredictionType, t: Tensor) -> Tensor:
        """A linear type's unit-scale error [B] as this weighting's loss: error · x0 weight · A(t)²."""
        return error * self.x0_weight(prediction, t) * prediction.x0_factor(t)

    def uncertainty(self, process: NoiseProcess) -> Uncertainty:
        """The denoiser's module that turns the weighted loss into the loss minimised (the identity here)."""
        return Uncertainty()


class Uncertainty(nn.Module):
    """The loss minimised is the weighted loss itself (no learned uncertainty)."""

    def adjust(self, loss: Tensor, t: Tensor) -> Tensor:
        """The loss to minimise from the weighted per-sample loss."""
        return loss


def _require(ok: bool, key: str, valid: str, value: object) -> None:
    """A one-line FrugalError naming the config key unless ``ok``."""
    if not ok:
        raise FrugalError(f"config key 'weighting.{key}' must be {valid}; got {value!r}")


def _positive(key: str, value: float) -> float:
    _require(math.isfinite(value) and value > 0, key, "a finite number > 0", value)
    return float(value)


WEIGHTINGS: Registry[Weighting] = Registry("diffusion.weighting")


@WEIGHTINGS.register("none")
class NoWeighting(Weighting):
    """The prediction type's own loss (x0 weight 1/A(t)²)."""

    def x0_weight(self, prediction: PredictionType, t: Tensor) -> Tensor:
        return 1 / prediction.x0_factor(t)

    def weigh(self, error: Tensor, prediction: PredictionType, t: Tensor) -> Tensor:
        return error  # exactly the type's own loss (error · 1/A² · A² would round)


@WEIGHTINGS.register("snr")
class SNRWeighting(Weighting):
    """ε-equivalent loss: x0 weight SNR (the ε-MSE whatever the prediction type)."""

    def x0_weight(self, prediction: PredictionType, t: Tensor) -> Tensor:
        return prediction.process.log_snr(t).exp()


@WEIGHTINGS.register("min_snr")
class MinSNRWeighting(Weighting):
    """Min-SNR-γ (Hang et al.): x0 weight min(SNR + 1, γ), or min(SNR, γ) as published with plus_one=false.

    Published form: ε weight min(SNR, γ)/SNR, v weight min(SNR, γ)/(SNR + 1) on v's raw loss, which goes
    to zero at high t (diffusers#9451: a v model then learns almost nothing there). The default adds 1,
    the community fix: v weight min(SNR + 1, γ)/(SNR + 1), i.e. the v-loss capped at γ, which keeps an
    x0 weight of at least 1 at every t for every prediction type.
    """

    def __init__(self, *, gamma: float = 5.0, plus_one: bool = True) -> None:
        self.gamma = _positive("min_snr.gamma", gamma)
        self.plus_one = plus_one

    def x0_weight(self, prediction: PredictionType, t: Tensor) -> Tensor:
        snr = prediction.process.log_snr(t).exp() + (1.0 if self.plus_one else 0.0)
        return snr.clamp(max=self.gamma)


@WEIGHTINGS.register("soft_min_snr")
class SoftMinSNRWeighting(Weighting):
    """Soft-min-SNR-γ: x0 weight 1/(1/SNR + 1/γ) = γ·sigmoid(λ − ln γ), a smooth min(SNR, γ)."""

    def __init__(self, *, gamma: float = 5.0) -> None:
        self.gamma = _positive("soft_min_snr.gamma", gamma)

    def x0_weight(self, prediction: PredictionType, t: Tensor) -> Tensor:
        return self.gamma * torch.sigmoid(prediction.process.log_snr(t) - math.log(self.gamma))


@WEIGHTINGS.register("p2")
class P2Weighting(Weighting):
    """P2 (Choi et al.): ε weight 1/(k + SNR)^γ, so x0 weight SNR/(k + SNR)^γ.

    Computed as exp(λ − γ·log(k + SNR)) with log(k + SNR) = ln k + softplus(λ − ln k).
    """

    def __init__(self, *, k: float = 1.0, gamma: float = 1.0) -> None:
        self.k = _positive("p2.k", k)
        _require(math.isfinite(gamma) and gamma >= 0, "p2.gamma", "a finite number ≥ 0", gamma)
        self.gamma = float(gamma)

    def x0_weight(self, prediction: PredictionType, t: Tensor) -> Tensor:
        lam, log_k = prediction.process.log_snr(t), math.log(self.k)
        return torch.exp(lam - self.gamma * (log_k + F.softplus(lam - log_k)))


@WEIGHTINGS.register("edm")
class EDMWeighting(Weighting):
    """EDM (Karras et al.): λ(σ̃) = (σ̃² + σ_d²)/(σ̃·σ_d)² on x̂0, so x0 weight SNR + 1/σ_d².

    σ̃ = σ/α is EDM's noise level and 1/σ̃² = SNR. ``sigma_data`` is this weighting's own σ_d; with EDM's
    preconditioning it makes the network's loss unit-weighted (λ·c_out² = 1).
    """

    def __init__(self, *, sigma_data: float = 0.5) -> None:
        self.sigma_data = _positive("edm.sigma_data", sigma_data)

    def x0_weight(self, prediction: PredictionType, t: Tensor) -> Tensor:
        return prediction.process.log_snr(t).exp() + self.sigma_data**-2


@WEIGHTINGS.register("debias")
class DebiasWeighting(Weighting):
    """Debiased estimation (Yu et al.): ε weight 1/√SNR, so x0 weight √SNR = exp(λ/2)."""

    def x0_weight(self, prediction: PredictionType, t: Tensor) -> Tensor:
        return torch.exp(prediction.process.log_snr(t) / 2)


def _log_flow_sigma(lam: Tensor) -> Tensor:
    """ln s for SD3's noise level s = σ/(α + σ) of the flow path with the same SNR: −ln(1 + √SNR)."""
    return -F.softplus(lam / 2)


@WEIGHTINGS.register("sigma_sqrt")
class SigmaSqrtWeighting(Weighting):
    """SD3 ``sigma_sqrt``: s⁻² on the flow-matching loss, so x0 weight s⁻⁴ = (1 + √SNR)⁴.

    This is diffusers' weight on the target ε − x0. Its scripts with ``precondition_outputs`` put the same
    s⁻² on an x0 loss instead, which is just the unweighted flow-matching loss.
    """

    def x0_weight(self, prediction: PredictionType, t: Tensor) -> Tensor:
        return torch.exp(-4 * _log_flow_sigma(prediction.process.log_snr(t)))


@WEIGHTINGS.register("flow_loss")
class FlowLossWeighting(Weighting):
    """The flow-matching (velocity) loss whatever the prediction type: x0 weight 1/max(s, clip)² for SD3's noise
    level s = σ/(α + σ) (t on the flow path), since the target ε − x0 gives x̂0 = x − s·v̂. JiT (Li & He 2025)
    trains an x0 prediction with it, s clipped at 0.05."""

    def __init__(self, *, clip: float = 0.05) -> None:
        _require(math.isfinite(clip) and 0 < clip < 1, "flow_loss.clip", "a number in (0, 1)", clip)
        self.clip = float(clip)

    def x0_weight(self, prediction: PredictionType, t: Tensor) -> Tensor:
        log_s = _log_flow_sigma(prediction.process.log_snr(t)).clamp(min=math.log(self.clip))
        return torch.exp(-2 * log_s)


@WEIGHTINGS.register("type_loss")
class TypeLossWeighting(Weighting):
    """Another prediction type's own loss whatever the prediction type: x0 weight 1/A(t)² of the named linear type
    (``x0``: the x0-MSE scaled as a direct prediction trains it), so that a blend or a mixture trains with a single
    type's per-t loss scale and the target and the loss scale can be measured apart."""

    def __init__(self, *, prediction: str = "x0") -> None:
        _require(prediction in LINEAR_TYPES, "type_loss.prediction", f"a linear type ({', '.join(LINEAR_TYPES)})",
                 prediction)
        self.prediction = prediction
        self._named: weakref.WeakKeyDictionary[PredictionType, PredictionType] = weakref.WeakKeyDictionary()

    def x0_weight(self, prediction: PredictionType, t: Tensor) -> Tensor:
        if prediction not in self._named:  # the named type on the model's process, built once per model
            self._named[prediction] = PREDICTIONS.create(self.prediction, prediction.process, prediction.sigma_data)
        return 1 / self._named[prediction].x0_factor(t)


@WEIGHTINGS.register("cosmap")
class CosMapWeighting(Weighting):
    """SD3 CosMap: 2/(π(1 − 2s + 2s²)) on the flow-matching loss, so x0 weight (2/π)·s⁻⁴/(1 + SNR).

    SD3 uses it as a sampling density of s; as a weight under uniform t it gives the same objective on the
    flow path. 1 − 2s + 2s² = s²(1 + SNR), hence the x0 form.
    """

    def x0_weight(self, prediction: PredictionType, t: Tensor) -> Tensor:
        lam = prediction.process.log_snr(t)
        return (2 / math.pi) * torch.exp(-4 * _log_flow_sigma(lam) - F.softplus(lam))


@WEIGHTINGS.register("sigmoid")
class SigmoidWeighting(Weighting):
    """Sigmoid weighting (Kingma & Gao 2023; SiD2, Hoogeboom et al. 2024): ε weight sigmoid(bias − λ), so x0 weight
    SNR·sigmoid(bias − λ) = e^bias·sigmoid(λ − bias): about SNR at high noise, the constant e^bias at low noise
    (monotone in λ, an ELBO with noise augmentation). A lower bias moves the emphasis to higher noise; SiD2 lowers
    it for larger images."""

    def __init__(self, *, bias: float = 2.0) -> None:
        _require(math.isfinite(bias) and -20 <= bias <= 20, "sigmoid.bias", "a number in [-20, 20]", bias)
        self.bias = float(bias)

    def x0_weight(self, prediction: PredictionType, t: Tensor) -> Tensor:
        return math.exp(self.bias) * torch.sigmoid(prediction.process.log_snr(t) - self.bias)


@WEIGHTINGS.register("speed")
class SpeeDWeighting(Weighting):
    """SpeeD's change-aware weighting (Wang et al. 2024, ``Speed_IDDPM._weights("ours")``): ε weight
    (1 − lam) + (2·lam − 1)·ĝ(t) where x_t still changes (log-SNR above ``tau_log_snr``), 1 in the convergence area
    beyond it (as SpeeD's code does); x0 weight that times SNR.

    g = d(1 − ᾱ)/dt, the speed at which the noise share grows, is dσ²/dt of the VP path with the same SNR:
    d sigmoid(−λ)/dt; ĝ is g scaled to [0, 1] over t ∈ [t_min, t_τ]. SpeeD's lam = 0.6 gives weights 0.4–0.6,
    highest where the noise grows fastest.
    """

    GRID = 2001  # points of t on which g is normalised

    def __init__(self, *, lam: float = 0.6, tau_log_snr: float = -5.0) -> None:
        _require(math.isfinite(lam) and 0 <= lam <= 1, "speed.lam", "a number in [0, 1]", lam)
        _require(math.isfinite(tau_log_snr), "speed.tau_log_snr", "a finite number", tau_log_snr)
        self.lam, self.tau_log_snr = float(lam), float(tau_log_snr)
        self._range: weakref.WeakKeyDictionary[NoiseProcess, tuple[float, float]] = weakref.WeakKeyDictionary()

    @staticmethod
    def noise_growth(process: NoiseProcess, t: Tensor) -> Tensor:
        """g(t) = d sigmoid(−λ(t))/dt = −λ'(t)·sigmoid(λ)·sigmoid(−λ), with λ' = 2(α'/α − σ'/σ)."""
        t = t.to(torch.float64)
        lam = process.log_snr(t)
        d_lam = 2 * (process.d_alpha(t) / process.alpha(t) - process.d_sigma(t) / process.sigma(t))
        return -d_lam * torch.sigmoid(lam) * torch.sigmoid(-lam)

    def _limits(self, process: NoiseProcess) -> tuple[float, float]:
        if process not in self._range:  # per process object, never by id (a new object may reuse a freed id)
            tau = float(process.t_of_log_snr(torch.tensor([self.tau_log_snr], dtype=torch.float64)))
            g = self.noise_growth(process, torch.linspace(process.t_min, max(tau, process.t_min * 2), self.GRID,
                                                          dtype=torch.float64))
            self._range[process] = (float(g.min()), float(g.max()))
        return self._range[process]

    def eps_weight(self, process: NoiseProcess, t: Tensor) -> Tensor:
        """SpeeD's weight on the ε-MSE."""
        low, high = self._limits(process)
        scaled = ((self.noise_growth(process, t) - low) / max(high - low, 1e-30)).clamp(0, 1)
        weight = (1 - self.lam) + (2 * self.lam - 1) * scaled
        return torch.where(process.log_snr(t.to(torch.float64)) > self.tau_log_snr, weight, torch.ones_like(weight))

    def x0_weight(self, prediction: PredictionType, t: Tensor) -> Tensor:
        process = prediction.process
        return (self.eps_weight(process, t) * process.log_snr(t.to(torch.float64)).exp()).to(t.dtype)


@WEIGHTINGS.register("learned")
class LearnedWeighting(NoWeighting):
    """EDM2's learned uncertainty: loss L·e^(−u(t)) + u(t) on the type's own loss L; optimum e^u = E[L | t].

    Its x0 weight is that of ``none``; u lives in the denoiser (:class:`LearnedUncertainty`).
    """

    def __init__(self, *, features: int = 32) -> None:
        _require(isinstance(features, int) and 1 <= features <= 4096, "learned.features",
                 "an integer in [1, 4096]", features)
        self.features = features

    def uncertainty(self, process: NoiseProcess) -> LearnedUncertainty:
        return LearnedUncertainty(process, self.features)


class LearnedUncertainty(Uncertainty):
    """u(t), the learned log of the expected loss at t, and the loss L·e^(−u) + u.

    u is a linear map (initialised to zero) of Fourier features √2·cos(2π(f·s + φ)) of the noise level
    s = σ/(α + σ) (SD3's σ, equal to t on the flow path), with fixed frequencies f ~ N(0, 1)
    and phases φ ~ U(0, 1) from a fixed seed, kept as buffers. s is bounded, unlike EDM2's ln(σ̃)/4 = −λ/8,
    whose far ends are rarely sampled under uniform t and then extrapolate wildly; and unlike t it spreads
    out the low-noise end of VP paths.
    """

    def __init__(self, process: NoiseProcess, features: int = 32) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("freqs", torch.randn(features, generator=generator))
        self.register_buffer("phases", torch.rand(features, generator=generator))
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.process = process

    def forward(self, t: Tensor) -> Tensor:
        """u(t) [B]."""
        s = torch.exp(_log_flow_sigma(self.process.log_snr(t))).to(self.freqs.dtype)
        features = math.sqrt(2) * torch.cos(2 * math.pi * (s[:, None] * self.freqs + self.phases))
        return self.linear(features).squeeze(-1)

    def adjust(self, loss: Tensor, t: Tensor) -> Tensor:
        u = self(t)
        return loss * torch.exp(-u) + u
