"""Prediction types: what the network is trained to output, and how x̂0 follows from it.

Every type here is a linear target h(t) = a(t)·x0 + b(t)·ε (``../shared/reference/prediction-types.md``).
The network output F is trained towards h/c with c² = a²σ_d² + b², so it is unit-scale at every t;
x̂0 = (b·x_t − σ·c·F)/D with D = b·α − σ·a. An x0 error of F is amplified by A(t) = σ·c/|D|, so the
unweighted F-space loss equals an x0-space loss weighted by 1/A².
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from .errors import FrugalError
from .noise import PROCESSES, NoiseProcess, bcast
from .registry import Registry

Coefficients = Callable[[NoiseProcess, Tensor], tuple[Tensor, Tensor]]


class LossWeighting(Protocol):
    """What a prediction type's loss asks of a loss weighting (:class:`frugaldiff.weighting.Weighting`)."""

    def x0_weight(self, prediction: PredictionType, t: Tensor) -> Tensor: ...

    def weigh(self, error: Tensor, prediction: PredictionType, t: Tensor) -> Tensor: ...


class PredictionType:
    """Interface between a network's raw output and x̂0, bound to one process and σ_data."""

    name = "prediction"

    def __init__(self, process: NoiseProcess, sigma_data: float) -> None:
        self.process = process
        self.sigma_data = sigma_data

    def out_channels(self, data_channels: int) -> int:
        """How many output channels the network needs for data with ``data_channels``."""
        return data_channels

    def to_x0(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """x̂0 from the raw network output."""
        raise NotImplementedError

    def x0_factor(self, t: Tensor) -> Tensor:
        """A(t)²: an x0-space weight times this is the weight on the type's own unit-scale error."""
        raise NotImplementedError

    def loss(self, out: Tensor, x_t: Tensor, x0: Tensor, eps: Tensor, t: Tensor,
             weighting: LossWeighting) -> Tensor:
        """Per-sample training loss [B] of the raw output ``out`` under ``weighting`` (``none``: the type's own
        unit-variance loss)."""
        raise NotImplementedError

    def to_eps(self, x0_hat: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """ε̂ implied by x̂0: (x_t − α·x̂0)/σ."""
        p = self.process
        return (x_t - bcast(p.alpha(t), x_t) * x0_hat) / bcast(p.sigma(t), x_t)

    def input_scale(self, t: Tensor) -> Tensor:
        """c_in(t) = 1/√(α²σ_d² + σ²): scales x_t to unit variance before the network."""
        p = self.process
        return torch.rsqrt(p.alpha(t) ** 2 * self.sigma_data**2 + p.sigma(t) ** 2)


class LinearPrediction(PredictionType):
    """A target a(t)·x0 + b(t)·ε, given by ``coefficients(process, t) -> (a, b)``."""

    #: |D| below this fraction of σ·c means x0 cannot be recovered from the target.
    degenerate_ratio = 1e-4

    def __init__(self, process: NoiseProcess, sigma_data: float, coefficients: Coefficients,
                 name: str = "linear") -> None:
        super().__init__(process, sigma_data)
        self.coefficients = coefficients
        self.name = name
        self._check_recoverable()

    def _check_recoverable(self) -> None:
        if self.recoverable_on(self.process):
            return
        working = [n for n in PROCESSES.names() if self.recoverable_on(PROCESSES.create(n))]
        hint = f"use it with diffusion.process = {' or '.join(working)}" if working else "it works on no process"
        raise FrugalError(
            f"prediction type {self.name!r} cannot recover x0 on process {self.process.name!r} (its target is "
            f"degenerate there); choose another diffusion.prediction, or {hint}"
        )

    def recoverable_on(self, process: NoiseProcess) -> bool:
        """Whether x0 follows from this target on ``process`` at every t (|D| not tiny against σ·c)."""
        t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64).clamp(process.t_min, process.t_max)
        ratio = 1 / self.amplification(t, process)
        return bool(torch.all(torch.isfinite(ratio) & (ratio > self.degenerate_ratio)))

    def scaled_coefficients(self, t: Tensor, process: NoiseProcess | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(a, b, c): the target's coefficients and its standard deviation c (on ``process``, default ours)."""
        a, b = self.coefficients(process or self.process, t)
        a, b = a * torch.ones_like(t), b * torch.ones_like(t)
        c = torch.sqrt(a**2 * self.sigma_data**2 + b**2)
        return a, b, c

    def determinant(self, t: Tensor, process: NoiseProcess | None = None) -> Tensor:
        """D(t) = b·α − σ·a."""
        process = process or self.process
        a, b, _ = self.scaled_coefficients(t, process)
        return b * process.alpha(t) - process.sigma(t) * a

    def amplification(self, t: Tensor, process: NoiseProcess | None = None) -> Tensor:
        """A(t) = σ·c/|D|: how much an error of the unit-scale output grows in x0."""
        process = process or self.process
        _, _, c = self.scaled_coefficients(t, process)
        return process.sigma(t) * c / self.determinant(t, process).abs()

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The unit-variance training target h/c."""
        a, b, c = self.scaled_coefficients(t)
        return (bcast(a, x0) * x0 + bcast(b, x0) * eps) / bcast(c, x0)

    def to_x0(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        _, b, c = self.scaled_coefficients(t)
        sigma, d = self.process.sigma(t), self.determinant(t)
        return (bcast(b, x_t) * x_t - bcast(sigma * c, x_t) * out) / bcast(d, x_t)

    def error(self, out: Tensor, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Per-sample squared error [B] of the unit-scale output against :meth:`target`."""
        return (out.float() - self.target(x0, eps, t)).pow(2).flatten(1).mean(1)

    def x0_factor(self, t: Tensor) -> Tensor:
        """A(t)²: turns an x0-space loss weight into a weight on :meth:`error`."""
        return self.amplification(t) ** 2

    def loss(self, out: Tensor, x_t: Tensor, x0: Tensor, eps: Tensor, t: Tensor,
             weighting: LossWeighting) -> Tensor:
        return weighting.weigh(self.error(out, x0, eps, t), self, t)


PREDICTIONS: Registry[PredictionType] = Registry("diffusion.prediction")
LINEAR_TYPES: list[str] = []  # names registered through register_linear_prediction, in order


def register_linear_prediction(name: str, coefficients: Coefficients) -> None:
    """Register a user-defined target a(t)·x0 + b(t)·ε under ``name``.

    ``coefficients(process, t)`` returns the pair (a, b) for a batch of times.
    """

    def factory(process: NoiseProcess, sigma_data: float) -> LinearPrediction:
        return LinearPrediction(process, sigma_data, coefficients, name=name)

    factory.__doc__ = f"Linear target {name!r}."
    PREDICTIONS.register(name)(factory)
    LINEAR_TYPES.append(name)


def _eps(p: NoiseProcess, t: Tensor) -> tuple[Tensor, Tensor]:
    return torch.zeros_like(t), torch.ones_like(t)


def _x0(p: NoiseProcess, t: Tensor) -> tuple[Tensor, Tensor]:
    return torch.ones_like(t), torch.zeros_like(t)


def _v(p: NoiseProcess, t: Tensor) -> tuple[Tensor, Tensor]:
    return -p.sigma(t), p.alpha(t)


def _velocity(p: NoiseProcess, t: Tensor) -> tuple[Tensor, Tensor]:
    """dx_t/dt = α'·x0 + σ'·ε: the paper's *velocity* (flow: ε − x0; on VP paths the direction of v)."""
    return p.d_alpha(t), p.d_sigma(t)


def _acceleration(p: NoiseProcess, t: Tensor) -> tuple[Tensor, Tensor]:
    """d²x_t/dt² = α''·x0 + σ''·ε: the paper's *acceleration* (degenerate on flow and VP-cosine)."""
    return p.dd_alpha(t), p.dd_sigma(t)


register_linear_prediction("eps", _eps)
register_linear_prediction("x0", _x0)
register_linear_prediction("v", _v)
register_linear_prediction("velocity", _velocity)
register_linear_prediction("acceleration", _acceleration)

#: diffusion.blend.weights by default: inverse-error shares of x0 against velocity per tenth of t, from the x0 errors
#: measured on mnist5000 (docs/prediction-types.md, vp-linear, 20k images): x0 takes 28 % next to t = 0, half above.
BLEND_WEIGHTS = [0.276, 0.472, 0.512, 0.513, 0.511, 0.506, 0.502, 0.502, 0.502, 0.504]


def inverse_error_shares(first: Sequence[float], second: Sequence[float]) -> list[float]:
    """Per bin, the share of the second of two estimators with these mean squared errors in their inverse-error
    weighted average, E1/(E1 + E2): the best combination of two unbiased estimators with uncorrelated errors."""
    return [e1 / (e1 + e2) for e1, e2 in zip(first, second, strict=True)]


def blend_prediction(process: NoiseProcess, sigma_data: float, first: str, second: str,
                     weights: Sequence[float]) -> LinearPrediction:
    """One head whose target moves between two linear types with t, so that its x̂0 is the average
    λ(t)·x̂0_second + (1 − λ(t))·x̂0_first of what the two types' outputs would give.

    ``weights`` are λ at the centres of equal bins of [0, 1] (interpolated linearly, constant beyond the outer
    centres). With unit targets h̃_k = h_k/c_k of determinant D̃_k = σ/A_k (the second oriented like the first),
    the target (1 − w)·h̃_1 + w·h̃_2 gives exactly x̂0 = [(1 − w)·D̃_1·x̂0_1 + w·D̃_2·x̂0_2] / [(1 − w)·D̃_1 + w·D̃_2],
    so w = λ·A_2 / (λ·A_2 + (1 − λ)·A_1) realises λ. λ ≡ 0 is the first type exactly, λ ≡ 1 the second (up to
    its sign). EDM's preconditioning is the special case of x0 and ε with its own c_skip, c_out.
    """
    types = [PREDICTIONS.create(name, process, sigma_data) for name in (first, second)]
    if not all(isinstance(t, LinearPrediction) for t in types):
        raise FrugalError(f"diffusion.blend.types = {[first, second]} must name two linear types; choose from: "
                          f"{', '.join(LINEAR_TYPES)}")
    if not weights or not all(0 <= w <= 1 for w in weights):
        raise FrugalError(f"diffusion.blend.weights = {list(weights)} must be one or more numbers in [0, 1] (the "
                          "second type's share of x̂0 per equal bin of t)")
    table = torch.tensor(list(weights), dtype=torch.float64)
    centres = (torch.arange(len(table), dtype=torch.float64) + 0.5) / len(table)

    def share(t: Tensor) -> Tensor:
        """λ(t), piecewise linear through the bin centres."""
        if len(table) == 1:
            return table.to(t).expand_as(t)
        x = t.to(torch.float64).clamp(centres[0], centres[-1])
        i = (torch.searchsorted(centres, x, right=True) - 1).clamp(0, len(table) - 2)
        frac = (x - centres[i]) / (centres[i + 1] - centres[i])
        return (table[i] + frac * (table[i + 1] - table[i])).to(t.dtype)

    def coefficients(p: NoiseProcess, t: Tensor) -> tuple[Tensor, Tensor]:
        (a1, b1, c1), (a2, b2, c2) = (k.scaled_coefficients(t, p) for k in types)
        sign = torch.sign(types[0].determinant(t, p) * types[1].determinant(t, p))
        amp1, amp2 = (k.amplification(t, p) for k in types)
        lam = share(t)
        w = lam * amp2 / (lam * amp2 + (1 - lam) * amp1)
        return (1 - w) * a1 / c1 + w * sign * a2 / c2, (1 - w) * b1 / c1 + w * sign * b2 / c2

    return LinearPrediction(process, sigma_data, coefficients, name="blend")


@PREDICTIONS.register("blend")
def _blend(process: NoiseProcess, sigma_data: float, *, types: list[str] = ["velocity", "x0"],  # noqa: B006
           weights: list[float] = BLEND_WEIGHTS) -> LinearPrediction:  # noqa: B006 - never mutated
    """One head, a t-dependent target between two linear types; weights: the second's share of x̂0 per t bin.

    :func:`blend_prediction`; the default weights are the inverse-error shares measured on mnist5000.
    """
    if len(types) != 2:
        raise FrugalError(f"diffusion.blend.types = {list(types)} must name exactly two linear types, e.g. "
                          '["velocity", "x0"]')
    return blend_prediction(process, sigma_data, types[0], types[1], weights)


GATES = ("timestep", "pixel", "analytic", "switch")
MEASURED_GATES = ("analytic", "switch")  # gates from the heads' measured errors, no parameters
STRATEGIES = ("joint", "heads", "heads+joint")
#: The mixture's types when diffusion.mixed.types is empty (the default), less those the process leaves undefined.
DEFAULT_MIXED_TYPES = ("x0", "velocity", "acceleration")


class MixedPrediction(PredictionType, nn.Module):
    """K heads, one per linear type, mixed in x0 by gate weights π = softmax(logits).

    The ``timestep`` gate is a small MLP on features of t (its parameters live here, so they are part of the
    denoiser, its EMA and its checkpoints); the ``pixel`` gate reads K extra logits per output element from the
    network. The ``analytic`` gate learns nothing: it weighs the heads by the inverse of their x0 errors measured
    on the training batches in ``bins`` equal bins of t (running means, an EMA with ``decay`` after the first
    1/(1 − decay) observations, from losses computed with gradients in training mode; buffers, so checkpointed
    and copied to the EMA model), the best combination of
    estimators with uncorrelated errors; ``switch`` gives each bin's best head all the weight (a per-t hard
    switch). Both start with equal weights.
    ``strategy`` is the loss: ``joint`` (x0 error of the mixture only), ``heads`` (each head on its
    own target, the gate on the mixture's x0 error with the heads detached) or ``heads+joint`` (their sum).
    """

    name = "mixed"
    frequencies = 8  # sin/cos features of t for the timestep gate

    def __init__(self, process: NoiseProcess, sigma_data: float, types: list[str], gate: str,
                 strategy: str, bins: int = 20, decay: float = 0.99) -> None:
        nn.Module.__init__(self)
        PredictionType.__init__(self, process, sigma_data)
        explicit = bool(types)  # [] (the default): those of DEFAULT_MIXED_TYPES the process defines
        types = list(types) or list(DEFAULT_MIXED_TYPES)
        bad = [n for n in types if n not in LINEAR_TYPES]
        if bad or len(set(types)) != len(types):
            raise FrugalError(f"diffusion.mixed.types = {types} must list distinct linear types; choose from: "
                              f"{', '.join(LINEAR_TYPES)}")
        if gate not in GATES:
            raise FrugalError(f"unknown diffusion.mixed.gate {gate!r}; choose one of: {', '.join(GATES)}")
        if not (isinstance(bins, int) and bins >= 1 and 0 <= decay < 1):
            raise FrugalError(f"diffusion.mixed.bins = {bins} and decay = {decay} must be an integer >= 1 and a "
                              "number in [0, 1)")
        if strategy not in STRATEGIES:
            raise FrugalError(f"unknown diffusion.mixed.strategy {strategy!r}; choose one of: "
                              f"{', '.join(STRATEGIES)}")
        heads: dict[str, LinearPrediction] = {}
        for name in types:
            try:
                heads[name] = PREDICTIONS.create(name, process, sigma_data)
            except FrugalError:  # the type cannot recover x0 on this process (e.g. acceleration on flow)
                pass
        unusable = [n for n in types if n not in heads]
        if unusable and explicit:
            usable = list(heads) or ["x0", "velocity"]
            raise FrugalError(f"diffusion.mixed.types {types} includes {unusable}, which cannot recover x0 on process "
                              f"{process.name!r}; set diffusion.mixed.types = {json.dumps(usable)} or "
                              "diffusion.process = \"vp-linear\"")
        self.types, self.gate, self.strategy = list(heads), gate, strategy
        self.heads: list[LinearPrediction] = list(heads.values())
        self.gate_net = None
        if gate == "timestep":
            k = len(self.heads)
            self.gate_net = nn.Sequential(nn.Linear(2 * self.frequencies + 1, 64), nn.SiLU(), nn.Linear(64, k))
            nn.init.zeros_(self.gate_net[-1].weight)  # start from equal weights
            nn.init.zeros_(self.gate_net[-1].bias)
        self.decay = decay
        if gate in MEASURED_GATES:
            self.register_buffer("head_errors", torch.ones(bins, len(self.heads)))
            self.register_buffer("head_counts", torch.zeros(bins, dtype=torch.long))

    def out_channels(self, data_channels: int) -> int:
        """One block of ``data_channels`` per head, and one per head for the pixel gate's logits."""
        return data_channels * len(self.heads) * (2 if self.gate == "pixel" else 1)

    def _time_features(self, t: Tensor) -> Tensor:
        """t and sin/cos(kπt), k = 1..frequencies, in the gate's dtype and device [B, 2F + 1]."""
        weight = self.gate_net[0].weight
        t = t.to(weight)[:, None]
        angle = t * torch.arange(1, self.frequencies + 1, device=weight.device, dtype=weight.dtype) * math.pi
        return torch.cat([t, angle.sin(), angle.cos()], 1)

    def _chunks(self, out: Tensor) -> tuple[Tensor, ...]:
        """The network output split into the heads' outputs, then (pixel gate) the heads' gate logits."""
        k = len(self.heads)
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        return out.chunk(2 * k if self.gate == "pixel" else k, dim=1)

    def heads_x0(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Each head's x̂0, stacked [B, K, ...]."""
        return torch.stack([h.to_x0(c, x_t, t) for h, c in zip(self.heads, self._chunks(out), strict=False)], 1)

    def gate_weights(self, out: Tensor, t: Tensor) -> Tensor:
        """π [B, K] for the timestep and the measured gates, [B, K, ...] (one per output element) for the pixel
        gate."""
        if self.gate_net is not None:
            return torch.softmax(self.gate_net(self._time_features(t)), dim=1)
        if self.gate in MEASURED_GATES:
            errors = self.head_errors[self._bin(t)].float()
            if self.gate == "switch":
                return nn.functional.one_hot(errors.argmin(1), len(self.heads)).float()
            inverse = 1 / errors.clamp_min(1e-12)
            return inverse / inverse.sum(1, keepdim=True)
        return torch.softmax(torch.stack(self._chunks(out)[len(self.heads):], 1), dim=1)

    def _bin(self, t: Tensor) -> Tensor:
        bins = len(self.head_errors)
        return (t.detach() * bins).long().clamp(0, bins - 1).to(self.head_errors.device)

    @torch.no_grad()
    def observe(self, x0s: Tensor, x0: Tensor, t: Tensor) -> None:
        """Take in each head's x0 squared error on a training batch (the measured gates' running means per bin);
        under torchrun the per-bin sums of every rank's share, so that every rank keeps the same means."""
        dtype = self.head_errors.dtype
        errors = (x0s.detach().to(dtype) - x0.detach().to(dtype)[:, None]).pow(2).flatten(2).mean(2)  # [B, K]
        bins = self._bin(t)
        finite = torch.isfinite(errors).all(1)
        bins, errors = bins[finite], errors[finite]
        n = torch.bincount(bins, minlength=len(self.head_errors))
        sums = torch.zeros_like(self.head_errors).index_add_(0, bins, errors)
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # every rank: the whole batch
            both = torch.cat([sums, n[:, None].to(dtype)], 1)
            torch.distributed.all_reduce(both)
            sums, n = both[:, :-1], both[:, -1].round().long()
        seen = n > 0
        self.head_counts += n
        rate = torch.maximum(n / self.head_counts.clamp_min(1), torch.tensor(1 - self.decay)).to(dtype)[:, None]
        batch_mean = sums / n.clamp_min(1)[:, None]
        self.head_errors.copy_(torch.where(seen[:, None], self.head_errors + rate * (batch_mean - self.head_errors),
                                           self.head_errors))

    def _mix(self, x0s: Tensor, weights: Tensor) -> Tensor:
        return (weights.reshape(*weights.shape, *[1] * (x0s.dim() - weights.dim())) * x0s).sum(1)

    def to_x0(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return self._mix(self.heads_x0(out, x_t, t), self.gate_weights(out, t))

    def x0_factor(self, t: Tensor) -> Tensor:
        """min_k A_k(t)²: without a weighting, the mixture's x0 error is measured in its best head's scale."""
        return torch.stack([h.x0_factor(t) for h in self.heads]).min(0).values

    def loss(self, out: Tensor, x_t: Tensor, x0: Tensor, eps: Tensor, t: Tensor,
             weighting: LossWeighting) -> Tensor:
        x0s, weights = self.heads_x0(out, x_t, t), self.gate_weights(out, t)
        if self.gate in MEASURED_GATES and self.training and torch.is_grad_enabled():  # training batches only
            self.observe(x0s, x0, t)
        w = weighting.x0_weight(self, t)

        def mixture_error(heads: Tensor) -> Tensor:
            return (self._mix(heads, weights) - x0).pow(2).flatten(1).mean(1) * w

        loss = torch.zeros_like(w)
        if self.strategy in ("heads", "heads+joint"):
            heads = zip(self.heads, self._chunks(out), strict=False)
            loss = loss + sum(h.loss(c, x_t, x0, eps, t, weighting) for h, c in heads)
            loss = loss + mixture_error(x0s.detach())
        if self.strategy in ("joint", "heads+joint"):
            loss = loss + mixture_error(x0s)
        return loss


@PREDICTIONS.register("mixed")
def _mixed(process: NoiseProcess, sigma_data: float, *, types: list[str] = [],  # noqa: B006
           gate: str = "timestep", strategy: str = "heads", bins: int = 20, decay: float = 0.99) -> MixedPrediction:
    """K heads of linear types (default []: those of x0, velocity, acceleration the process defines) mixed by a gate.

    gate: timestep, pixel, analytic or switch (bins, decay: the last two's error bins of t and running mean);
    strategy: joint, heads or heads+joint (:class:`MixedPrediction`).
    """
    return MixedPrediction(process, sigma_data, types, gate, strategy, bins, decay)
