import math

import pytest
import torch

from frugaldiff.components import build_process
from frugaldiff.config import Config
from frugaldiff.noise import (
    PROCESSES,
    NoiseProcess,
    ShiftedProcess,
    VPLinear,
    ddpm_alphas_cumprod,
    empirical_posterior_mean,
    immiscible_order,
    shifted,
)
from frugaldiff.prediction import PREDICTIONS

T = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)


def test_ddpm_grid_matches_vp_linear():
    alphas_cumprod = ddpm_alphas_cumprod(1000, 1e-4, 0.02)
    t = (torch.arange(1000, dtype=torch.float64) + 1) / 1000
    assert (VPLinear().alpha(t) ** 2 - alphas_cumprod).abs().max() < 1e-3


@pytest.mark.parametrize("name", PROCESSES.names())
@pytest.mark.parametrize("fn", ["d_alpha", "d_sigma", "dd_alpha", "dd_sigma"])
def test_closed_form_derivatives_match_autograd(name, fn):
    process = PROCESSES.create(name)
    base = fn.split("_")[1]
    numeric = NoiseProcess._derivative(process, base, T, fn.count("d"))
    torch.testing.assert_close(getattr(process, fn)(T), numeric, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", PROCESSES.names())
def test_endpoints_and_log_snr(name):
    process = PROCESSES.create(name)
    zero = torch.zeros(1, dtype=torch.float64)
    assert process.alpha(zero).item() == pytest.approx(1.0, abs=1e-12)
    assert process.sigma(zero).item() == pytest.approx(0.0, abs=1e-12)
    assert process.alpha(torch.tensor([process.t_max])).item() < 0.01
    lam = process.log_snr(T)
    torch.testing.assert_close(lam, 2 * torch.log(process.alpha(T) / process.sigma(T)), rtol=1e-10, atol=1e-10)
    assert bool(torch.all(lam[1:] < lam[:-1])), "log-SNR must fall with t"


@pytest.mark.parametrize("name", ["vp-linear", "vp-cosine"])
def test_vp_paths_preserve_variance(name):
    process = PROCESSES.create(name)
    a, s = process.alpha(T), process.sigma(T)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(T), rtol=0, atol=1e-12)
    # α·α' + σ·σ' = 0 on every VP path
    torch.testing.assert_close(a * process.d_alpha(T) + s * process.d_sigma(T), torch.zeros_like(T), rtol=0, atol=1e-10)


def test_user_process_gets_derivatives_by_autograd():
    class Quadratic(NoiseProcess):
        def alpha(self, t):
            return 1 - t**2

        def sigma(self, t):
            return t

    p = Quadratic()
    torch.testing.assert_close(p.d_alpha(T), -2 * T)
    torch.testing.assert_close(p.dd_alpha(T), torch.full_like(T, -2.0))
    torch.testing.assert_close(p.dd_sigma(T), torch.zeros_like(T))


@pytest.mark.parametrize("name", ["vp-linear", "flow"])
def test_empirical_posterior_mean_is_the_bayes_average_over_the_references(name):
    process = PROCESSES.create(name)
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(50, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.05, 0.3, 0.6, 0.9], dtype=torch.float64)
    x_t = process.add_noise(reference[:4], torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64), t)
    # brute force: Gaussian likelihood of x_t under each reference, normalised in float64
    alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
    log_lik = -((x_t.flatten(1)[:, None, :] - alpha[..., None] * reference.flatten(1)[None]) ** 2).sum(-1) / (
        2 * sigma**2)
    expected = (torch.softmax(log_lik, 1) @ reference.flatten(1)).reshape(x_t.shape)
    got = empirical_posterior_mean(process, x_t, t, reference)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=1e-5)


def test_empirical_posterior_mean_ends_at_the_own_image_and_the_references_mean():
    process = PROCESSES.create("flow")
    g = torch.Generator().manual_seed(1)
    reference = torch.rand(64, 1, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(8, 1, 8, 8, generator=g)
    near_data = torch.full((8,), 1e-3)
    x_t = process.add_noise(reference[:8], eps, near_data)
    assert torch.equal(empirical_posterior_mean(process, x_t, near_data, reference), reference[:8])
    pure_noise = torch.ones(8)  # α = 0: every reference is equally likely
    torch.testing.assert_close(empirical_posterior_mean(process, eps, pure_noise, reference),
                               reference.mean(0, keepdim=True).expand(8, -1, -1, -1), atol=1e-6, rtol=0)
    one = reference[5:6]
    assert torch.equal(empirical_posterior_mean(process, x_t, torch.full((8,), 0.5), one), one.expand(8, -1, -1, -1))


@pytest.mark.parametrize("name", ["flow", "vp-linear", "vp-cosine"])
def test_a_shift_of_one_is_the_process_itself_and_a_shift_maps_t_monotonically_onto_the_interval(name):
    base = PROCESSES.create(name)
    assert type(build_process(Config({"diffusion.process": name, "diffusion.shift": 1.0}), (3, 32, 32))) is type(base)
    assert shifted(base, 1.0) is base
    t = torch.linspace(base.t_min, base.t_max, 2001, dtype=torch.float64)
    for shift in (0.5, 2.0, 4.0):
        process = ShiftedProcess(base, shift)
        w = process.warp(t)
        assert bool((w[1:] >= w[:-1]).all()) and base.t_min <= w.min() and w.max() <= base.t_max
        free = (w > base.t_min) & (w < base.t_max)  # away from the clamped ends, exactly λ − 2 ln s
        torch.testing.assert_close(process.log_snr(t)[free], base.log_snr(t)[free] - 2 * math.log(shift),
                                   rtol=1e-9, atol=1e-9)
        assert (shift > 1) == bool((process.log_snr(t)[free] < base.log_snr(t)[free]).all())
        # its own [t_min, t_max] is where the warp stays off the base's clamp: α and σ still move there, so every
        # prediction type converts to x0 at both ends (a shifted flow run once sampled NaN from t_max)
        ends = torch.linspace(process.t_min, process.t_max, 101, dtype=torch.float64)
        assert bool((process.d_alpha(ends) != 0).all() and (process.d_sigma(ends) != 0).all())
        with torch.inference_mode():  # generation runs there: autograd's derivatives must still come out
            inside = process.d_alpha(ends), process.dd_sigma(ends)
        assert torch.equal(inside[0], process.d_alpha(ends)) and torch.equal(inside[1], process.dd_sigma(ends))
        assert base.t_min <= process.t_min < process.t_max <= base.t_max
        if shift > 1:  # the noisiest time is the base's own
            torch.testing.assert_close(process.alpha(ends[-1:]), base.alpha(ends.new_tensor([base.t_max])))
        velocity = PREDICTIONS.create("velocity", process, 0.5)
        x_t, out = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
        assert torch.isfinite(velocity.to_x0(out, x_t, ends[[0, -1]])).all()
    if name == "flow":  # SD3's closed form
        torch.testing.assert_close(ShiftedProcess(base, 3.0).warp(t), (3 * t / (1 + 2 * t)).clamp(max=base.t_max))
    auto = build_process(Config({"diffusion.process": name, "diffusion.shift": "auto"}), (3, 32, 32))
    assert auto.shift == pytest.approx(math.sqrt(3 * 32 * 32 / 784))


def test_immiscible_order_is_the_optimal_permutation():
    """A permutation; never worse than the identity; on 6 pairs equal to the best of all 720 orders."""
    import itertools

    g = torch.Generator().manual_seed(0)
    for n in (1, 6, 32):
        x0, eps = torch.randn(n, 1, 4, 4, generator=g) * 0.5, torch.randn(n, 1, 4, 4, generator=g)
        order = immiscible_order(x0, eps)
        assert sorted(order.tolist()) == list(range(n))
        cost = torch.cdist(x0.flatten(1).double(), eps.flatten(1).double())
        assigned = float(cost[torch.arange(n), order].sum())
        assert assigned <= float(cost.diagonal().sum()) + 1e-9
        if n == 6:
            best = min(sum(float(cost[i, p[i]]) for i in range(n)) for p in itertools.permutations(range(n)))
            assert abs(assigned - best) < 1e-9


def test_immiscible_noise_is_still_standard_normal_for_every_slot():
    """Over many batches of real images in random order, the noise a fixed slot of the batch gets after the
    assignment is N(0, I): its coordinates are normal (KS) and its squared norm χ² with D degrees of freedom."""
    from scipy import stats

    from frugaldiff.datasets import load_dataset

    images = load_dataset("digits").train
    g = torch.Generator().manual_seed(1)
    first, norms, gain = [], [], []
    for _ in range(1500):
        x0 = images[torch.randperm(len(images), generator=g)[:8]]
        eps = torch.randn(x0.shape, generator=g)
        assigned = eps[immiscible_order(x0, eps)]
        first.append(float(assigned[0].flatten()[len(first) % 64]))
        norms.append(float(assigned[0].pow(2).sum()))
        gain.append(float((x0 - assigned).flatten(1).norm(dim=1).sum() / (x0 - eps).flatten(1).norm(dim=1).sum()))
    assert stats.kstest(first, "norm").pvalue > 1e-3
    assert stats.kstest(norms, stats.chi2(64).cdf).pvalue > 1e-3
    assert sum(gain) / len(gain) < 0.99  # the pairing is shorter than the drawn one
