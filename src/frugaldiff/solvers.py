"""Generation solvers: from noise at t_max to data at t = 0, seeing the model only as x̂0 = denoise(x_t, t).

Because every solver works from the denoiser alone (ε̂ = (x_t − α·x̂0)/σ follows from it), each one
runs with every prediction type and every process. A solver moves x along a time grid from
``time_grid``; the last grid entry is t = 0, and the step onto it returns x̂0 itself (as EDM does for
σ → 0), so a grid of ``steps`` intervals costs ``steps`` denoiser calls for first-order solvers.

Times, α, σ and λ are computed in float64 and enter the float32 updates of x as Python scalars.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm import tqdm

from .errors import FrugalError
from .noise import NoiseProcess
from .registry import Registry

Denoise = Callable[[Tensor, Tensor], Tensor]

def _at(process: NoiseProcess, t: float) -> tuple[float, float, float]:
    """(α, σ, λ) at one time, in float64."""
    tt = torch.tensor(t, dtype=torch.float64)
    return float(process.alpha(tt)), float(process.sigma(tt)), float(process.log_snr(tt))


#: Schedules map fractions u ∈ [0, 1] (u = 0 at t_max, u = 1 at t_end) to times:
#: ``fn(process, u, t_end, rho) -> t``; only "karras" uses ``rho``.
SCHEDULES: Registry[Tensor] = Registry("sample.schedule")


@SCHEDULES.register("uniform")
def _uniform(process: NoiseProcess, u: Tensor, t_end: float, rho: float) -> Tensor:
    """Uniform in t."""
    return process.t_max + u * (t_end - process.t_max)


@SCHEDULES.register("logsnr")
def _logsnr(process: NoiseProcess, u: Tensor, t_end: float, rho: float) -> Tensor:
    """Uniform in λ = log(α²/σ²)."""
    lam0, lam1 = _at(process, process.t_max)[2], _at(process, t_end)[2]
    return process.t_of_log_snr(lam0 + u * (lam1 - lam0))


@SCHEDULES.register("karras")
def _karras(process: NoiseProcess, u: Tensor, t_end: float, rho: float) -> Tensor:
    """EDM's spacing: uniform in s^(1/ρ) for s = σ/α = exp(−λ/2)."""
    r0, r1 = (math.exp(-_at(process, t)[2] / (2 * rho)) for t in (process.t_max, t_end))
    return process.t_of_log_snr(-2 * rho * torch.log(r0 + u * (r1 - r0)))


def time_grid(process: NoiseProcess, steps: int, schedule: str = "karras", t_end: float = 1e-3,
              rho: float = 7.0) -> Tensor:
    """``steps + 1`` float64 times, strictly decreasing: t_max, ..., t_end, then exactly 0.

    ``schedule`` spaces the first ``steps`` times evenly in t ("uniform"), in λ ("logsnr") or in
    (σ/α)^(1/ρ) ("karras", EDM); λ is turned back into t numerically (:meth:`NoiseProcess.t_of_log_snr`).
    """
    if steps < 1:
        raise FrugalError(f"sample.steps must be at least 1, got {steps}")
    if not process.t_min <= t_end < process.t_max:
        raise FrugalError(f"t_end={t_end} must lie in [{process.t_min}, {process.t_max}) for process "
                          f"{process.name!r}")
    make = SCHEDULES.get(schedule)
    t = make(process, torch.linspace(0, 1, steps, dtype=torch.float64), t_end, rho)
    # Pin the ends exactly (the inverse is only accurate to ~1e-16); t_max last, so that a one-step
    # grid is [t_max, 0].
    t[-1] = t_end
    t[0] = process.t_max
    return torch.cat([t, t.new_zeros(1)])


def _noise(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None,
           device: str | torch.device) -> Tensor:
    """Standard normal float32 noise, drawn on the generator's device (so a CPU generator drives any
    device reproducibly) and moved to ``device``."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where).to(device)


def _times(t: float, x: Tensor) -> Tensor:
    """The per-sample time vector [B] that a denoiser takes."""
    return torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)


class Solver:
    """One generation method. :meth:`step` moves x from grid time t to the next time s > 0.

    Built per run (multistep solvers keep state) from ``(process, generator, eta)``; solvers other
    than DDIM ignore ``eta``.
    """

    name = "solver"

    def __init__(self, process: NoiseProcess, generator: torch.Generator | None, eta: float) -> None:
        self.process, self.generator, self.eta = process, generator, eta

    def step(self, denoise: Denoise, x: Tensor, x0: Tensor, t: float, s: float) -> Tensor:
        """x at time s < t, given x at t and x0 = denoise(x, t)."""
        raise NotImplementedError


SOLVERS: Registry[Solver] = Registry("sample.solver")


@SOLVERS.register("ddim")
class DDIM(Solver):
    """DDIM with η for any (α, σ) path: η = 0 is deterministic, η = 1 the DDPM posterior.

    ε̂ = (x − α_t x̂0)/σ_t, c = η σ_s √(1 − exp(λ_t − λ_s)), x_s = α_s x̂0 + √(σ_s² − c²) ε̂ + c z.
    """

    name = "ddim"

    def step(self, denoise: Denoise, x: Tensor, x0: Tensor, t: float, s: float) -> Tensor:
        a_t, sig_t, lam_t = _at(self.process, t)
        a_s, sig_s, lam_s = _at(self.process, s)
        eps = (x - a_t * x0) / sig_t
        c = self.eta * sig_s * math.sqrt(-math.expm1(lam_t - lam_s))
        x = a_s * x0 + math.sqrt(sig_s**2 - c**2) * eps
        if c > 0:
            x = x + c * _noise(x.shape, self.generator, x.device)
        return x


@SOLVERS.register("ddpm")
class DDPM(DDIM):
    """Ancestral sampling from the exact posterior q(x_s | x_t, x̂0): DDIM with η fixed at 1."""

    name = "ddpm"

    def __init__(self, process: NoiseProcess, generator: torch.Generator | None, eta: float) -> None:
        super().__init__(process, generator, eta)
        self.eta = 1.0


@SOLVERS.register("heun")
class Heun(Solver):
    """EDM's second-order Heun on the probability-flow ODE dy/ds = ε̂ in y = x/α, s = σ/α."""

    name = "heun"

    def step(self, denoise: Denoise, x: Tensor, x0: Tensor, t: float, s: float) -> Tensor:
        a_t, sig_t, _ = _at(self.process, t)
        a_s, sig_s, _ = _at(self.process, s)
        y, ds = x / a_t, sig_s / a_s - sig_t / a_t
        d = (x - a_t * x0) / sig_t
        x_euler = a_s * (y + ds * d)
        d_euler = (x_euler - a_s * denoise(x_euler, _times(s, x))) / sig_s
        return a_s * (y + 0.5 * ds * (d + d_euler))


@SOLVERS.register("dpm++2m")
class DPMSolverPP2M(Solver):
    """DPM-Solver++(2M): data prediction, multistep in λ/2 = log(α/σ); the first step is first order."""

    name = "dpm++2m"

    def __init__(self, process: NoiseProcess, generator: torch.Generator | None, eta: float) -> None:
        super().__init__(process, generator, eta)
        self._last: tuple[Tensor, float] | None = None  # the previous step's x̂0 and step size h

    def step(self, denoise: Denoise, x: Tensor, x0: Tensor, t: float, s: float) -> Tensor:
        _, sig_t, lam_t = _at(self.process, t)
        a_s, sig_s, lam_s = _at(self.process, s)
        h = 0.5 * (lam_s - lam_t)
        d = x0
        if self._last is not None:
            x0_prev, h_prev = self._last
            k = 0.5 * h / h_prev  # 1/(2r) with r = h_prev/h
            d = (1 + k) * x0 - k * x0_prev
        self._last = (x0, h)
        return (sig_s / sig_t) * x - a_s * math.expm1(-h) * d


def integrate(denoise: Denoise, process: NoiseProcess, x: Tensor, grid: Tensor, solver: str = "dpm++2m",
              eta: float = 0.0, generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """Move ``x`` from time grid[0] along ``grid`` (decreasing, ending at 0) with ``solver``.

    ``eta`` ∈ [0, 1] is DDIM's stochasticity; the other solvers ignore it ("ddpm" is η = 1).
    ``generator`` draws any solver noise.
    """
    if not 0 <= eta <= 1:
        raise FrugalError(f"sample.eta must lie in [0, 1], got {eta}")
    stepper = SOLVERS.create(solver, process, generator, eta)
    times = grid.tolist()
    intervals = zip(times[:-1], times[1:], strict=True)
    with torch.no_grad():
        for t, s in tqdm(intervals, total=len(times) - 1, desc=solver, disable=not progress):
            x0 = denoise(x, _times(t, x))
            x = x0 if s == 0 else stepper.step(denoise, x, x0, t, s)
    return x


def solve(denoise: Denoise, process: NoiseProcess, shape: tuple[int, ...], steps: int, solver: str = "dpm++2m",
          schedule: str = "karras", eta: float = 0.0, generator: torch.Generator | None = None,
          device: str | torch.device = "cpu", progress: bool = False) -> Tensor:
    """Generate a float32 batch of ``shape`` (batch first) with ``steps`` intervals of a ``schedule`` grid.

    Starts from x = σ(t_max)·z, z ~ N(0, I): the standard choice, which drops the α(t_max)·x0 part
    of the true x_{t_max} (α(t_max) ≤ 0.007 for the built-in processes). ``generator`` (on any
    device) draws the starting noise and any solver noise; see :func:`integrate` for ``eta``.
    """
    grid = time_grid(process, steps, schedule)
    x = _at(process, process.t_max)[1] * _noise(shape, generator, device)
    return integrate(denoise, process, x, grid, solver, eta, generator, progress)
