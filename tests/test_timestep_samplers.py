"""Timestep samplers: their distributions, weights, stratification, learning from losses and resuming."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats
from torch import Tensor

from frugaldiff.errors import FrugalError
from frugaldiff.noise import PROCESSES
from frugaldiff.objective import Batch
from frugaldiff.plots import plot_timestep_densities
from frugaldiff.timestep_samplers import TIMESTEP_SAMPLERS, PolicySampler, TimestepSampler, policy_features

VP = PROCESSES.create("vp-linear")
ALL = ["uniform", "stratified", "antithetic", "lognormal", "logit_normal", "mode", "beta", "near_zero", "speed",
       "laplace", "range", "loss_second_moment", "adaptive", "kim", "mixture", "curriculum"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make(name: str, seed: int = 0, process: str = "vp-linear", params: dict | None = None,
         **kwargs: Any) -> TimestepSampler:
    """A sampler with base arguments and its own parameters in ``kwargs``."""
    return TIMESTEP_SAMPLERS.create(name, process=PROCESSES.create(process), seed=seed, params=params, **kwargs)


def close(actual: Tensor, expected: Tensor | list[float], rel: float = 1e-12) -> bool:
    """Elementwise equal within a relative tolerance (cheaper to import than torch.testing)."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    return actual.dtype == torch.float64 and bool(((actual - expected).abs() <= rel * expected.abs() + 1e-15).all())


def decaying(t: Tensor) -> Tensor:
    """A smooth loss profile, high near t = 0 (monotone, for antithetic)."""
    return torch.exp(-5 * t) + 0.1


DECAYING_MEAN = (1 - math.exp(-5)) / 5 + 0.1


def peaked(t: Tensor) -> Tensor:
    """A loss profile with a bump at t = 0.3."""
    return 0.05 + torch.exp(-(((t - 0.3) / 0.05) ** 2))


def feed(sampler: TimestepSampler, loss: Callable[[Tensor], Tensor], steps: int, n: int = 8,
         noise: torch.Generator | None = None) -> None:
    """Train-loop stand-in: sample, then report loss(t), times a χ²₁ factor if ``noise`` is given."""
    for _ in range(steps):
        t, _ = sampler.sample(n)
        losses = loss(t)
        if noise is not None:
            losses = losses * torch.randn(n, generator=noise, dtype=torch.float64) ** 2
        sampler.update(t, losses)


def normal_cdf(x: np.ndarray) -> np.ndarray:
    return stats.norm.cdf(x)


def lognormal_cdf(process_name: str, p_mean: float = -1.2, p_std: float = 1.2) -> Callable[[np.ndarray], np.ndarray]:
    process = PROCESSES.create(process_name)

    def cdf(t: np.ndarray) -> np.ndarray:
        lam = process.log_snr(torch.from_numpy(np.clip(t, process.t_min, process.t_max))).numpy()
        return normal_cdf((-lam / 2 - p_mean) / p_std)

    return cdf


def mode_cdf(scale: float) -> Callable[[np.ndarray], np.ndarray]:
    """t(u) falls from 1 to 0, so P(T ≤ t) = 1 − u(t); u(t) by interpolation on a fine grid."""
    u = np.linspace(0, 1, 200_001)
    t_of_u = 1 - u - scale * (np.cos(np.pi * u / 2) ** 2 - 1 + u)
    return lambda t: 1 - np.interp(t, t_of_u[::-1], u[::-1])


def step_cdf(k: float, tau: float) -> Callable[[np.ndarray], np.ndarray]:
    z = k * tau + 1 - tau
    return lambda t: np.where(t < tau, k * t, k * tau + t - tau) / z


def logistic_normal_cdf(m: float, s: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda t: normal_cdf((np.log(t) - np.log1p(-t) - m) / s)


def laplace_cdf(process_name: str, mu: float = 0.0, b: float = 0.5) -> Callable[[np.ndarray], np.ndarray]:
    """λ falls with t, so P(T ≤ t) = P(Λ ≥ λ(t)) for Λ ~ Laplace(mu, b)."""
    process = PROCESSES.create(process_name)
    return lambda t: stats.laplace(mu, b).sf(process.log_snr(torch.from_numpy(
        np.clip(t, process.t_min, process.t_max))).numpy())


def speed_cdf(process_name: str, k: float = 5.0) -> Callable[[np.ndarray], np.ndarray]:
    """Half the draws from SpeeD's step density, half mirrored about t_m: ½(F(t) + F(t_m + t) − F(t_m − t))."""
    process = PROCESSES.create(process_name)
    tau, m = (float(process.t_of_log_snr(torch.tensor([lam], dtype=torch.float64))) for lam in (-5.0, -4.18))
    step = step_cdf(k, tau)

    def cdf(t: np.ndarray) -> np.ndarray:
        return 0.5 * (step(t) + step(np.clip(m + t, 0, 1)) - np.where(t < m, step(np.clip(m - t, 0, 1)), 0.0))

    return cdf


KS_CASES = [
    ("laplace", {}, laplace_cdf("vp-linear")),
    ("laplace", {"stratified": False}, laplace_cdf("vp-linear")),
    ("laplace", {"process": "flow", "mu": 1.0, "b": 1.5}, laplace_cdf("flow", 1.0, 1.5)),
    ("speed", {}, speed_cdf("vp-linear")),
    ("speed", {"process": "flow", "k": 2.0}, speed_cdf("flow", 2.0)),
    ("uniform", {}, lambda t: t),
    ("stratified", {}, lambda t: t),
    ("antithetic", {}, lambda t: t),
    ("adaptive", {}, lambda t: t),  # before any loss: stratified uniform
    ("lognormal", {}, lognormal_cdf("vp-linear")),
    ("lognormal", {"process": "vp-cosine", "p_mean": -0.4, "p_std": 1.0}, lognormal_cdf("vp-cosine", -0.4, 1.0)),
    ("lognormal", {"process": "flow"}, lognormal_cdf("flow")),
    ("logit_normal", {}, logistic_normal_cdf(0.5, 1.0)),
    ("logit_normal", {"m": 0.0, "stratified": False}, logistic_normal_cdf(0.0, 1.0)),
    ("logit_normal", {"m": 0.5, "s": 0.7}, logistic_normal_cdf(0.5, 0.7)),
    ("logit_normal", {"m": -0.5, "stratified": True}, logistic_normal_cdf(-0.5, 1.0)),
    ("lognormal", {"stratified": True}, lognormal_cdf("vp-linear")),
    ("mode", {}, mode_cdf(1.29)),
    ("mode", {"scale": -0.5}, mode_cdf(-0.5)),
    ("beta", {}, stats.beta(1.0, 1.5).cdf),
    ("beta", {"a": 2.0, "b": 0.7}, stats.beta(2.0, 0.7).cdf),
    ("near_zero", {}, step_cdf(5.0, 0.7)),
    ("near_zero", {"k": 3.0, "tau": 0.2, "keep_objective": True}, step_cdf(3.0, 0.2)),
    ("near_zero", {"shape": "power", "power": 3.0}, lambda t: t ** (1 / 3)),
    ("range", {"lo": 0.2, "hi": 0.45}, lambda t: np.clip((t - 0.2) / 0.25, 0, 1)),
    ("mixture", {"samplers": ["uniform", "near_zero"], "weights": [1.0, 3.0],
                 "params": {"near_zero": {"shape": "power"}}}, lambda t: 0.25 * t + 0.75 * np.sqrt(t)),
]


@pytest.mark.parametrize(("name", "kwargs", "cdf"), KS_CASES)
def test_draws_follow_the_intended_distribution(name: str, kwargs: dict, cdf: Callable) -> None:
    sampler = make(name, seed=1, **kwargs)
    t, w = (torch.cat(x) for x in zip(*(sampler.sample(500) for _ in range(24)), strict=True))
    assert t.dtype == w.dtype == torch.float64
    assert bool(((t >= 0) & (t <= 1)).all())
    if not sampler.keeps_objective:
        assert bool((w == 1).all())
    assert stats.kstest(t.numpy(), cdf).pvalue > 1e-3


def test_curriculum_moves_from_start_to_end() -> None:
    sampler = make("curriculum", start="near_zero", end="uniform", over=0.5,
                   params={"near_zero": {"shape": "power", "power": 4.0}})
    for progress, share, mean_t in [(0.0, 0.0, 0.2), (0.25, 0.5, 0.35), (0.5, 1.0, 0.5), (0.9, 1.0, 0.5)]:
        sampler.set_progress(progress)
        assert sampler.mix_weights().tolist() == [1 - share, share]
        t, w = sampler.sample(20_000)
        assert abs(t.mean().item() - mean_t) < 0.01
        assert not sampler.keeps_objective and bool((w == 1).all())
    assert stats.kstest(t.numpy(), "uniform").pvalue > 1e-3
    sampler.set_progress(0.25)
    mix_cdf = lambda t: 0.5 * t ** 0.25 + 0.5 * t  # noqa: E731
    assert stats.kstest(sampler.sample(20_000)[0].numpy(), mix_cdf).pvalue > 1e-3


STRATIFIED = [  # sampler, its parameters, and the map of its times to the uniform points it stratifies
    ("stratified", {}, lambda t: t),
    ("logit_normal", {"m": 0.3, "s": 0.8, "stratified": True},
     lambda t: torch.special.ndtr((torch.logit(t) - 0.3) / 0.8)),
    ("lognormal", {"stratified": True, "process": "flow"},
     lambda t: torch.from_numpy(lognormal_cdf("flow")(t.numpy()))),
]


@pytest.mark.parametrize(("name", "kwargs", "to_uniform"), STRATIFIED)
def test_stratified_puts_draw_i_of_a_global_batch_in_stratum_i(
        name: str, kwargs: dict, to_uniform: Callable[[Tensor], Tensor]) -> None:
    """The global batch of a step (all ranks and micro-steps; the trainer splits it into contiguous shares) fills
    its n strata once each, in order, with a fresh jitter every step."""
    sampler, n = make(name, seed=5, **kwargs), 24
    previous = None
    for _ in range(4):  # optimizer steps
        t = sampler.sample(n)[0]
        assert torch.equal((to_uniform(t) * n).floor().long(), torch.arange(n))
        assert previous is None or not torch.equal(t, previous)
        previous = t


@pytest.mark.parametrize("name", ALL)
def test_samplers_of_one_seed_stay_in_step_and_successive_draws_differ(name: str) -> None:
    """Every rank builds its sampler with the same seed and draws the same global batch."""
    params = {"mixture": {"samplers": ["stratified", "beta"]}}
    samplers = [make(name, seed=3, params=params, **params.get(name, {})) for _ in range(2)]
    first = [s.sample(12)[0] for s in samplers]
    second = [s.sample(12)[0] for s in samplers]
    assert torch.equal(first[0], first[1]) and torch.equal(second[0], second[1])
    assert not torch.equal(first[0], second[0])
    assert torch.equal(samplers[0].generator.get_state(), samplers[1].generator.get_state())


def test_antithetic_pairs_sum_to_one() -> None:
    sampler = make("antithetic")
    for n in (6, 7):
        t, w = sampler.sample(n)
        assert len(t) == n and bool((w == 1).all())
        assert close(t[0:n - 1:2] + t[1::2], [1.0] * (n // 2))


def fed(name: str, **kwargs: Any) -> TimestepSampler:
    """An importance sampler after 120 batches of 8 noisy ``decaying`` losses."""
    sampler = make(name, seed=2, **kwargs)
    feed(sampler, decaying, 120, noise=torch.Generator().manual_seed(0))
    assert not torch.equal(sampler.bin_probabilities(), torch.full((sampler.bins,), 1 / sampler.bins,
                                                                  dtype=torch.float64))
    return sampler


# (sampler factory, whether it must beat uniform's variance on `decaying`)
UNBIASED_CASES: dict[str, tuple[Callable[[], TimestepSampler], bool]] = {
    "uniform": (lambda: make("uniform"), False),
    "stratified": (lambda: make("stratified"), True),
    "antithetic": (lambda: make("antithetic"), True),
    "near_zero-step": (lambda: make("near_zero", keep_objective=True), True),
    "near_zero-power": (lambda: make("near_zero", shape="power", keep_objective=True), True),
    "loss_second_moment": (lambda: fed("loss_second_moment"), True),
    "adaptive": (lambda: fed("adaptive"), True),
    "adaptive-iid": (lambda: fed("adaptive", stratify=False), True),
    "mixture": (lambda: make("mixture", samplers=["uniform", "near_zero", "antithetic"], weights=[0.2, 0.5, 0.3],
                             params={"near_zero": {"keep_objective": True}}), False),
    "curriculum": (lambda: _at_progress(make("curriculum", start="uniform", end="near_zero", over=0.8,
                                             params={"near_zero": {"shape": "power", "keep_objective": True}}),
                                        0.4), False),
}


def _at_progress(sampler: TimestepSampler, progress: float) -> TimestepSampler:
    sampler.set_progress(progress)
    return sampler


def batch_means(sampler: TimestepSampler, batches: int = 800, n: int = 8) -> Tensor:
    """mean(w·f(t)) of each of ``batches`` batches of ``n``."""
    t, w = (torch.stack(x) for x in zip(*(sampler.sample(n) for _ in range(batches)), strict=True))
    return (w * decaying(t)).mean(dim=1)


@pytest.fixture(scope="module")
def uniform_variance() -> float:
    return batch_means(make("uniform", seed=11)).var().item()


@pytest.mark.parametrize("case", UNBIASED_CASES)
def test_weighted_loss_is_unbiased_for_the_uniform_objective(case: str, uniform_variance: float) -> None:
    factory, lower_variance = UNBIASED_CASES[case]
    sampler = factory()
    assert sampler.keeps_objective
    means = batch_means(sampler)
    standard_error = means.std().item() / math.sqrt(len(means))
    assert abs(means.mean().item() - DECAYING_MEAN) < 4 * standard_error
    if lower_variance:
        assert means.var().item() < 0.8 * uniform_variance


def test_mixture_weight_is_the_inverse_of_the_mixture_density() -> None:
    sampler = make("mixture", samplers=["uniform", "near_zero"], weights=[1.0, 3.0],
                   params={"near_zero": {"keep_objective": True, "k": 4.0, "tau": 0.5}})
    t, w = sampler.sample(1000)
    density = 0.25 + 0.75 * (0.4 + 1.2 * (t < 0.5).double())
    assert close(w, 1 / density)
    assert not make("mixture", samplers=["uniform", "beta"]).keeps_objective


@pytest.mark.parametrize("name", ["loss_second_moment", "adaptive"])
def test_importance_samplers_move_probability_to_high_loss_bins(name: str) -> None:
    sampler = make(name, seed=4)
    uniform = torch.full((32,), 1 / 32, dtype=torch.float64)
    feed(sampler, peaked, 3)
    assert torch.equal(sampler.bin_probabilities(), uniform)  # still warming up: uniform, weight 1
    assert bool((sampler.sample(8)[1] == 1).all())
    feed(sampler, peaked, 150, noise=torch.Generator().manual_seed(1))
    p = sampler.bin_probabilities()
    centres = (torch.arange(32, dtype=torch.float64) + 0.5) / 32
    assert abs(centres[p.argmax()].item() - 0.3) < 2 / 32
    assert p[(centres - 0.3).abs() < 0.1].sum() > 0.5  # 0.19 under uniform
    assert p[centres > 0.6].max() < 1 / 32
    t, w = sampler.sample(4000)
    assert ((t - 0.3).abs() < 0.1).double().mean() > 0.5
    assert close(w, 1 / sampler.density(t))


@pytest.mark.parametrize("kwargs", [{"name": "loss_second_moment"}, {"name": "adaptive"},
                                    {"name": "adaptive", "stratify": False, "smoothing": 0}])
def test_importance_samplers_draw_from_their_bin_probabilities(kwargs: dict) -> None:
    sampler = fed(**kwargs)
    cdf = np.concatenate([[0.0], np.cumsum(sampler.bin_probabilities().numpy())])
    t = torch.cat([sampler.sample(500)[0] for _ in range(24)])
    assert stats.kstest(t.numpy(), lambda x: np.interp(x, sampler.edges.numpy(), cdf)).pvalue > 1e-3


def test_adaptive_warms_up_within_a_few_hundred_images_at_batch_8() -> None:
    sampler = make("adaptive", seed=6)
    images = 0
    while torch.equal(sampler.bin_probabilities(), torch.full((32,), 1 / 32, dtype=torch.float64)):
        feed(sampler, decaying, 1)
        images += 8
    assert images <= 320


def test_adaptive_tracks_mean_and_variance_and_ignores_non_finite_losses() -> None:
    sampler = make("adaptive", bins=2, decay=0.5)
    sampler.update(torch.tensor([0.1, 0.2, 0.9, 0.3]), torch.tensor([1.0, 3.0, 5.0, math.nan]))
    assert close(sampler.mean, [2.0, 5.0])
    assert close(sampler.variance(), [1.0, 0.0])
    sampler.update(torch.tensor([0.6]), torch.tensor([7.0]))  # EMA at rate 1 − decay = 1/2 from now on
    assert close(sampler.mean, [2.0, 6.0])
    assert sampler.counts.tolist() == [2, 2]


RESUME_PARAMS = {
    "mixture": {"samplers": ["adaptive", "loss_second_moment", "uniform"], "weights": [0.3, 0.3, 0.4]},
    "curriculum": {"start": "stratified", "end": "adaptive"},
}


@pytest.mark.parametrize("name", ALL)
def test_state_survives_checkpoint_and_resume_exactly(name: str) -> None:
    def step(sampler: TimestepSampler, i: int) -> tuple[Tensor, Tensor]:
        sampler.set_progress(i / 60)
        t, w = sampler.sample(16)
        sampler.update(t, peaked(t) * (1 + t))
        return t, w

    def build(seed: int) -> TimestepSampler:
        return make(name, seed=seed, params=RESUME_PARAMS, **RESUME_PARAMS.get(name, {}))

    original = build(seed=7)
    for i in range(50):
        step(original, i)
    learners = original.children if name in RESUME_PARAMS else [original]
    for learner in learners:  # the importance samplers are past their warm-up
        if hasattr(learner, "bin_probabilities"):
            assert learner.bin_probabilities().max() > 2 / learner.bins
    state = original.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    resumed = [build(seed=8), build(seed=9)]
    resumed[0].load_state_dict(state)
    resumed[1].load_state_dict(torch.load(buffer, weights_only=True))
    for i in range(50, 62):
        t, w = step(original, i)
        for other in resumed:
            t2, w2 = step(other, i)
            assert torch.equal(t, t2) and torch.equal(w, w2)


def test_speed_and_laplace_reproduce_their_papers_shapes() -> None:
    """SpeeD's thresholds fall at its steps 700 and 642 of 1,000 on DDPM's linear schedule; its step density puts
    5/3.8 of the uniform density below and 1/3.8 above; a batch's second half mirrors its first. The Laplace
    schedule's log-SNR at a few t (Hang et al., mu = 0, b = 0.5)."""
    speed = make("speed")
    assert abs(speed.tau - 0.700) < 0.005 and abs(speed.mirror - 0.642) < 0.005
    t = torch.tensor([0.1, 0.5, 0.69, 0.71, 0.95], dtype=torch.float64)
    assert close(speed.base.density(t), [5 / (5 * speed.tau + 1 - speed.tau)] * 3 + [1 / (5 * speed.tau + 1 -
                                                                                           speed.tau)] * 2, rel=1e-9)
    drawn, _ = speed.sample(9)
    assert torch.equal(drawn[5:], (speed.mirror - drawn[:4]).abs()) and bool((drawn[5:] <= speed.mirror).all())
    grid = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    assert abs(float(torch.trapezoid(speed.density(grid), grid)) - 1) < 1e-3
    laplace = make("laplace")
    u = torch.tensor([0.001, 0.01, 0.1, 0.25, 0.5, 0.9, 0.999], dtype=torch.float64)
    expected = [3.107304, 1.956012, 0.804719, 0.346574, 0.0, -0.804719, -3.107304]
    torch.testing.assert_close(laplace.log_snr_of(u), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)


BAD_PARAMETERS = [
    ("speed", {"k": 0.5}, "k"),
    ("speed", {"tau_log_snr": math.inf}, "tau_log_snr"),
    ("laplace", {"b": 0.0}, "b"),
    ("laplace", {"mu": math.nan}, "mu"),
    ("lognormal", {"p_std": 0.0}, "p_std"),
    ("lognormal", {"p_mean": math.nan}, "p_mean"),
    ("logit_normal", {"s": -1.0}, "s"),
    ("mode", {"scale": 2.0}, "scale"),
    ("mode", {"scale": -1.5}, "scale"),
    ("beta", {"a": 0.0}, "a"),
    ("beta", {"b": -2.0}, "b"),
    ("near_zero", {"shape": "cubic"}, "shape"),
    ("near_zero", {"k": 0.5}, "k"),
    ("near_zero", {"tau": 1.0}, "tau"),
    ("near_zero", {"power": 0.5}, "power"),
    ("range", {"lo": -0.1}, "lo"),
    ("range", {"lo": 0.6, "hi": 0.4}, "hi"),
    ("loss_second_moment", {"bins": 0}, "bins"),
    ("loss_second_moment", {"history": 0}, "history"),
    ("loss_second_moment", {"uniform_mix": 1.5}, "uniform_mix"),
    ("adaptive", {"bins": 0}, "bins"),
    ("adaptive", {"decay": 1.0}, "decay"),
    ("adaptive", {"warmup": 0}, "warmup"),
    ("adaptive", {"smoothing": -1}, "smoothing"),
    ("adaptive", {"floor": 0.0}, "floor"),
    ("mixture", {"samplers": []}, "samplers"),
    ("mixture", {"samplers": ["uniform", "nope"]}, "samplers"),
    ("mixture", {"samplers": ["uniform", "mixture"]}, "samplers"),
    ("mixture", {"weights": [1.0]}, "weights"),
    ("mixture", {"weights": [-1.0, 2.0]}, "weights"),
    ("mixture", {"weights": [0.0, 0.0]}, "weights"),
    ("curriculum", {"over": 0.0}, "over"),
    ("curriculum", {"start": "curriculum"}, "start"),
    ("curriculum", {"end": "nope"}, "end"),
]


@pytest.mark.parametrize(("name", "kwargs", "param"), BAD_PARAMETERS)
def test_bad_parameters_give_a_one_line_error_naming_the_key(name: str, kwargs: dict, param: str) -> None:
    with pytest.raises(FrugalError, match=f"^timestep_sampler\\.{name}\\.{param} = ") as info:
        make(name, **kwargs)
    assert "\n" not in str(info.value) and "use " in str(info.value)


def test_registry_and_documented_objective() -> None:
    assert sorted(TIMESTEP_SAMPLERS.names()) == sorted(ALL)
    for name in ALL:
        sampler = make(name)
        phrase = "keeps the uniform objective" if sampler.keeps_objective else "changes"
        assert phrase in (type(sampler).__doc__ or "").splitlines()[0], name
    assert make("near_zero", keep_objective=True).keeps_objective


def test_plot_timestep_densities_writes_a_png(tmp_path) -> None:
    out = tmp_path / "densities.png"
    plot_timestep_densities(["lognormal", "near_zero"], "flow", out, n=2000,
                            params={"near_zero": {"keep_objective": True}})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- Kim et al.'s policy sampler ---------------------------------------------------------------------------

def images(n: int, seed: int = 0) -> Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def policy_step(sampler: PolicySampler, x0: Tensor, reward: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Train-loop stand-in: draw for ``x0``; on a probed step, report an objective that falls by ``reward(rows' t,
    rows' x0)`` over the update."""
    t, _ = sampler.draw(x0)
    probe = sampler.probe(Batch(x0, t.float(), torch.ones(len(t)), torch.randn_like(x0)))
    if probe is not None:
        before = torch.ones(len(probe.t))
        sampler.learn(before, before - reward(probe.t.double(), probe.x0))
    return t


def test_kim_starts_nearly_uniform_and_draws_each_image_from_its_own_beta() -> None:
    sampler = make("kim", seed=1)
    start = float(torch.nn.functional.softplus(torch.tensor(0.5))) + 1e-5
    t = torch.cat([sampler.draw(images(500, seed=i))[0] for i in range(4)])
    assert stats.kstest(t.numpy(), stats.beta(start, start).cdf).pvalue > 1e-3
    assert stats.kstest(sampler.sample(2000)[0].numpy(), stats.beta(start, start).cdf).pvalue > 1e-3
    with torch.no_grad():  # a policy whose Beta depends on the image
        sampler.policy.net[-1].weight.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    x0 = torch.cat([torch.ones(3000, 1, 8, 8), -torch.ones(3000, 1, 8, 8)])
    with torch.no_grad():
        dist = sampler.policy(policy_features(x0))
    alpha, beta = dist.concentration1.double(), dist.concentration0.double()
    assert (alpha[0] - alpha[-1]).abs() + (beta[0] - beta[-1]).abs() > 0.5
    t, w = sampler.draw(x0)
    assert bool((w == 1).all())
    for rows in (slice(0, 3000), slice(3000, None)):  # bright and dark images, each from its own Beta
        a, b = float(alpha[rows][0]), float(beta[rows][0])
        assert stats.kstest(t[rows].numpy(), stats.beta(a, b).cdf).pvalue > 1e-3


def test_kim_probes_the_first_step_and_every_every_steps_at_its_probe_and_grid_times() -> None:
    sampler = make("kim", every=3, probes=2, grid=5)
    x0 = images(4)
    probed = []
    for _ in range(7):
        t, _ = sampler.draw(x0)
        probe = sampler.probe(Batch(x0, t.float(), torch.ones(4), torch.zeros_like(x0), labels=torch.arange(4)))
        probed.append(probe is not None)
        if probe is not None:
            assert len(probe.x0) == 2 * 4 + 5 and probe.eps.abs().sum() > 0
            grid = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
            assert torch.allclose(probe.t, torch.cat([grid[[0, 0, 0, 0, 1, 1, 1, 1]], grid]).float())
            assert torch.equal(probe.x0[:8], x0.repeat(2, 1, 1, 1))
            assert torch.equal(probe.labels[:8], torch.arange(4).repeat(2))
            assert (probe.x0[8:] == probe.x0[8]).all() and bool((probe.importance == 1).all())
            sampler.learn(torch.ones(13), torch.ones(13))
    assert probed == [True, False, False, True, False, False, True]


def test_kim_policy_moves_towards_the_times_whose_updates_lower_the_loss() -> None:
    """REINFORCE: images whose updates at low t lowered the probe loss learn to draw lower times."""
    sampler = make("kim", every=1, lr=0.01)
    x0 = images(64)
    draws = [policy_step(sampler, x0, lambda t, x: torch.zeros(len(t))) for _ in range(3)]
    assert abs(torch.cat(draws).mean().item() - 0.5) < 0.05
    rewarded = PolicySampler.learn

    def learn(self, before: Tensor, after: Tensor) -> None:  # reward = 1 − 2t of the drawn t, per image
        features, t = self._pending
        n, k = len(t), len(self.chosen)
        delta = torch.zeros(len(before))
        delta[: n * k] = ((1 - 2 * t) / k).repeat(k).float()
        rewarded(self, before, before - delta)

    sampler.learn = learn.__get__(sampler)
    for _ in range(150):
        policy_step(sampler, x0, lambda t, x: torch.zeros(len(t)))
    later = torch.cat([sampler.draw(x0)[0] for _ in range(5)])
    assert later.mean() < 0.3, later.mean()


def test_kim_probe_times_are_scikit_learns_f_regression_choice() -> None:
    feature_selection = pytest.importorskip("sklearn.feature_selection")
    rng = np.random.default_rng(0)
    sampler = make("kim", probes=3, grid=12, history=20)
    assert sampler.chosen == [0, 1, 2]
    sweeps = rng.normal(size=(20, 12)) * rng.uniform(0.1, 3, size=12)
    sampler.sweeps = sweeps[:1].tolist()
    sampler._choose()
    assert sampler.chosen == [0, 1, 2]  # one sweep: no choice yet
    sampler.sweeps = sweeps.tolist()
    sampler._choose()
    best = feature_selection.SelectKBest(feature_selection.f_regression, k=3).fit(sweeps, sweeps.sum(1))
    assert sampler.chosen == sorted(np.flatnonzero(best.get_support()).tolist())


def test_kim_state_resumes_exactly_and_a_composite_refuses_it() -> None:
    def reward(t: Tensor, x: Tensor) -> Tensor:
        return (1 - t) * x.flatten(1).mean(1)

    original = make("kim", seed=3, every=2)
    for i in range(9):
        policy_step(original, images(16, seed=i), reward)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    resumed = make("kim", seed=4, every=2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.chosen == original.chosen and resumed.sweeps == original.sweeps
    for i in range(9, 15):
        assert torch.equal(policy_step(original, images(16, seed=i), reward),
                           policy_step(resumed, images(16, seed=i), reward))
    for a, b in zip(original.policy.parameters(), resumed.policy.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(FrugalError, match="^timestep_sampler.mixture.samplers = "):
        make("mixture", samplers=["uniform", "kim"])
